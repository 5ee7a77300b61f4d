#!/usr/bin/env bash
# Install the system packages duplex needs, only those missing. Idempotent.
set -euo pipefail
# chromium: the real browser the web page tests drive headless (issue 16).
# libspeexdsp1: the default echo canceller of talk and connect (issue 15).
PKGS=(libportaudio2 libsndfile1 pulseaudio pulseaudio-utils libasound2-plugins espeak-ng tmux openssl chromium libspeexdsp1)
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "duplex needs these system packages, which are missing: ${missing[*]}" >&2
  echo "Install them as root:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "Installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"

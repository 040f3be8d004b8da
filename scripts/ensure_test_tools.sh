#!/usr/bin/env bash
# The Debian tools the tests use as oracles and real peers, installed before any test runs:
#   chromium          web UI and HTML report checks (Playwright drives /usr/bin/chromium)
#   dicom3tools       dciodvfy, DICOM conformance oracle for written DICOM
#   orthanc           a real PACS for the DICOMweb / DIMSE tests
#   orthanc-dicomweb  Orthanc's DICOMweb plugin
# (dcm2niix and dcmqi come from the package index with the dev extra.)
# Missing ones are installed with apt-get when running as root; otherwise the script stops
# with one message naming what to install. --check-only never installs.
set -euo pipefail

check_only=0
[[ "${1:-}" == "--check-only" ]] && check_only=1
# where Debian puts them when they are not on PATH (overridable, e.g. for the script's test)
plugins_dir="${ORTHANC_PLUGINS_DIR:-/usr/share/orthanc/plugins}"
chromium_bin="${CHROMIUM_BIN:-/usr/bin/chromium}"
orthanc_bin="${ORTHANC_BIN:-/usr/sbin/Orthanc}"

missing=()
command -v chromium >/dev/null 2>&1 || [[ -x "$chromium_bin" ]] || missing+=(chromium)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || [[ -x "$orthanc_bin" ]] || missing+=(orthanc)
compgen -G "${plugins_dir}/libOrthancDicomWeb.so*" >/dev/null 2>&1 || missing+=(orthanc-dicomweb)

if (( ${#missing[@]} == 0 )); then
  exit 0
fi
if (( check_only == 0 )) && (( EUID == 0 )) && command -v apt-get >/dev/null 2>&1; then
  echo "installing test tools with apt-get: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "make test: missing Debian packages: ${missing[*]} -- install them first:" \
     "sudo apt-get install ${missing[*]}" >&2
exit 1

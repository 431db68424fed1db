#!/usr/bin/env bash
# Prepares a real ComfyUI 0.8.0 and a real browser for the real-host and browser tests, then prints the
# environment to use (eval "$(bash .ci/comfyui.sh)"): COMFYUI_PATH, COMFYUI_PYTHON, WEGEN_REQUIRE_COMFYUI=1.
#
# - ComfyUI's source (read-only; COMFYUI_SRC, default ../shared/ComfyUI) is copied to a temp folder.
# - ComfyUI runs in its own virtual environment that sees this interpreter's packages (the pack's requirements)
#   but holds its own torch: ComfyUI imports torchvision at start-up, and no torchvision imports beside the
#   project's pinned CPU torch 2.13.0, so the venv takes torch 2.14.1 + torchvision 0.29.1 (the pair pip finds on
#   the project's machines). The tests' own interpreter keeps the pinned torch. torchaudio is left out (ComfyUI
#   then skips its audio nodes).
# - Debian's chromium and chromium-driver are installed when missing.
# Everything it says goes to stderr; stdout carries only the export lines.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${COMFYUI_SRC:-../shared/ComfyUI}"
[ -f "$src/main.py" ] || { echo "no ComfyUI source at $src (set COMFYUI_SRC)" >&2; exit 1; }
src="$(cd "$src" && pwd)"
work="${COMFYUI_WORK:-$(mktemp -d /tmp/wegen-comfyui.XXXXXX)}"
mkdir -p "$work"

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing Debian's chromium and chromium-driver" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >&2
fi

if [ ! -f "$work/ComfyUI/main.py" ]; then
  echo "copying ComfyUI from $src to $work/ComfyUI" >&2
  cp -r "$src" "$work/ComfyUI"
  chmod -R u+w "$work/ComfyUI"
fi
if [ ! -x "$work/venv/bin/python" ]; then
  echo "building ComfyUI's environment in $work/venv" >&2
  python -m venv --system-site-packages "$work/venv"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$work/ComfyUI/requirements.txt" > "$work/requirements.txt"
  "$work/venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 -r "$work/requirements.txt" >&2
fi
"$work/venv/bin/python" -c "import torch, torchvision, aiohttp" >&2

echo "export COMFYUI_PATH='$work/ComfyUI'"
echo "export COMFYUI_PYTHON='$work/venv/bin/python'"
echo "export WEGEN_REQUIRE_COMFYUI=1"

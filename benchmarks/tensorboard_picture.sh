#!/usr/bin/env bash
# The README's picture of TensorBoard: a run's curves as TensorBoard's own page shows them.
#   bash benchmarks/tensorboard_picture.sh RUN_DIR OUT.png [TAG_FILTER]
# Needs a run trained with `loggers: [{name: tensorboard}]` and a headless Chromium
# (`apt-get install chromium`). Starts TensorBoard on a free local port, screenshots the time
# Scalars page filtered to TAG_FILTER (default: the training losses), stops TensorBoard.
set -euo pipefail
run_dir=${1:?RUN_DIR}; out=${2:?OUT.png}; filter=${3:-train/(total|flow|coor)}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "error: no headless Chromium found (apt-get install chromium)" >&2; exit 2; }
ls "$run_dir"/events.out.tfevents.* >/dev/null 2>&1 || { echo "error: $run_dir: no TensorBoard event files" >&2; exit 2; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run=$(basename "$run_dir")
.venv/bin/tensorboard --logdir_spec "$run:$run_dir" --port "$port" --host 127.0.0.1 >/dev/null 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.5; done
query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$filter")
# the Scalars tab draws with SVG (the Time Series tab's WebGL charts stay blank in a headless browser)
"$browser" --headless=new --no-sandbox --enable-unsafe-swiftshader --use-angle=swiftshader --hide-scrollbars --window-size=1400,1000 \
  --virtual-time-budget=60000 --run-all-compositor-stages-before-draw --screenshot="$out" \
  "http://127.0.0.1:$port/#scalars&runSelectionState=e30%3D&tagFilter=$query" >/dev/null 2>&1
echo "wrote $out"

#!/bin/bash
# Hand check, not run by CI (needs root, /dev/fuse and LazyFS: ../shared/powerloss/README.md).
# Delivered chunks are marked in their lane record's watermark instead of removed
# (docs/reliability.md, "What an acknowledgement writes"). A simulated power cut while chunks are
# being delivered and marked must lose no event acknowledged to its sender; what it may do is
# send again chunks delivered after the last fsync (duplicates). 40,000 events in 400 requests
# of 100, small delivery batches (many acknowledgements), a cut once the intake has about half;
# then a restart, and a count: acknowledged, delivered, missing (must be 0), duplicated.
# Usage: LAZYFS_BIN=... POWERLOSS=/path/to/shared/powerloss tests/powerloss/watermark.sh
# (from the repository root; fixed local ports 47621-47623)
PORT_BASE=47620
QUEUE_EXTRA="generation_bytes = 4194304"
INTAKE_EXTRA="batch_max_events = 300"
. "$(dirname "$0")/common.sh"
start_mock --keep-events 1000000
# A slow intake, so that the cut finds deliveries in flight and being marked.
mock_faults '{"delay_ms": 20}'
start_forwarder fwd1.log
# The sender records each event of a request answered 200 (acknowledged: durable).
python3 - "$SRC" "$W/acked" <<'PY' &
import sys, requests
src, out = sys.argv[1], sys.argv[2]
s = requests.Session()
with open(out, "w") as f:
    for r in range(400):
        events = [f"wm-{r:04}-{i:03} " + "x" * 150 for i in range(100)]
        try:
            resp = s.post(f"http://{src}/jsons", json=events, timeout=10,
                          headers={"X-SEKOIAIO-INTAKE-KEY": "0123456789abcdef0123456789abcdef"})
        except requests.RequestException:
            break
        if resp.status_code == 200:
            f.write("\n".join(e.split()[0] for e in events) + "\n")
            f.flush()
PY
SENDER=$!
for i in $(seq 1 600); do
  n=$(curl -s http://$MOCK/_mock/stats | python3 -c "import json,sys; print(json.load(sys.stdin)['accepted_events'])" 2>/dev/null)
  [ "${n:-0}" -ge 20000 ] && break; sleep 0.1
done
echo "delivered before the cut: $n"
lfs_powerloss "$W/state" $PID
wait $SENDER
mock_faults '{}'
start_forwarder fwd2.log
wait_drained
count_delivered "$W/acked"
kill $PID; wait $PID; kill $MP
lfs_stop "$W/state" nockpt

#!/bin/bash
# Hand check, not run by CI (needs root, /dev/fuse and LazyFS: ../shared/powerloss/README.md).
# 24 events of 200 KB refused for good (400) by the mock intake become dead letters in the
# meta database; then a simulated power cut; prints how many dead letters survive (all 24 must).
# Usage: LAZYFS_BIN=... POWERLOSS=/path/to/shared/powerloss tests/powerloss/dead_letters.sh
# (from the repository root; fixed local ports 47611-47613)
PORT_BASE=47610 BIN=${BIN:-target/debug/sekoia-forwarder}
. "$(dirname "$0")/common.sh"
start_mock
mock_faults '{"reject_containing": "poison"}'
start_forwarder fwd1.log
KEY=0123456789abcdef0123456789abcdef
for i in $(seq 1 24); do
  python3 -c "import random,sys; random.seed($i); sys.stdout.write('poison-$i-' + ''.join(random.choice('0123456789abcdef') for _ in range(200000)))" > $W/ev
  curl -s -o /dev/null -w "%{http_code} " -H "X-SEKOIAIO-INTAKE-KEY: $KEY" --data-binary @$W/ev http://$SRC/plain
done; echo
for i in $(seq 1 300); do
  n=$(curl -s http://$ADM/status | python3 -c "import json,sys; print(json.load(sys.stdin)['queue']['dead_letters'])" 2>/dev/null)
  [ "$n" = 24 ] && break; sleep 0.2
done
echo "dead letters before the cut: $n"
curl -s http://$ADM/metrics | grep -E "meta_blob_fsyncs|meta_fsyncs_total" 
ls $W/mnt/q/meta/blobs 2>/dev/null | wc -l
lfs_powerloss "$W/state" $PID
start_forwarder fwd2.log
n=$(curl -s http://$ADM/status | python3 -c "import json,sys; print(json.load(sys.stdin)['queue']['dead_letters'])")
echo "dead letters after the cut: $n"
curl -s http://$ADM/dead-letters | head -c 300; echo
kill $PID; wait $PID; kill $MP
lfs_stop "$W/state" nockpt

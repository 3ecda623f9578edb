#!/usr/bin/env bash
# Raw retention (issue 23): storage and refit time of the 4,844 real covers, every raw feature
# kept (a copy of indexes/covers) against a new index keeping a sample of 1,000.
#   bash scripts/bench_retention.sh [WORK]        # WORK defaults to /tmp/bench_retention
set -euo pipefail
WORK=${1:-/tmp/bench_retention}
rm -rf "$WORK" && mkdir -p "$WORK"
python -c "import sys; sys.path.insert(0, 'scripts'); from bench_coldstart import cpu_line; print(cpu_line())"
cp -r indexes/covers "$WORK/all"
stylegen embed ../shared/data/covers/covers.csv --index "$WORK/sample" --raw-sample 1000 --no-progress
python - "$WORK" <<'PY'
import sys
from stylegen.index.retention import raw_storage
for name in ("all", "sample"):
    print(name, raw_storage(f"{sys.argv[1]}/{name}"))
PY
/usr/bin/time -f "refit, all raw kept: %e s, max RSS %M KB" stylegen index "$WORK/all" --refit
/usr/bin/time -f "refit, sample of 1,000: %e s, max RSS %M KB" stylegen index "$WORK/sample" --refit
python - "$WORK" <<'PY'
import sys
import numpy as np
import stylegen
a, b = (stylegen.Index.open(f"{sys.argv[1]}/{n}", use_gpu=False) for n in ("all", "sample"))
print("same feature_id:", a.feature_id == b.feature_id,
      "max |difference| of vectors:", float(np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max()))
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

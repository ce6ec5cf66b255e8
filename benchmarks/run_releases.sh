#!/usr/bin/env bash
# accelerate on older releases: the families of docs/how-to/accelerate.md through the same census
# (derive, check by execution, eval and rate-0 identity, no branch at rate 1), each release
# installed beside the current one with `pip install --target DIR` (timm with --no-deps).
# Usage: bash benchmarks/run_releases.sh DIR... ; each DIR holds one release of timm or
# transformers, or is `timm` or `transformers` for the release installed in the environment.
# Writes benchmarks/releases.json, whose table (`python benchmarks/census.py --markdown
# benchmarks/releases.json`) is in docs/models.md.
set -euo pipefail
out=benchmarks/releases.json
tmp=$(mktemp -d)
for dir in "$@"; do
  case "$dir" in
    timm | transformers) lib=$dir; path=src ;;
    *) lib=$([ -d "$dir/timm" ] && echo timm || echo transformers); path="$dir:src" ;;
  esac
  if [ "$lib" = timm ]; then families="vision_transformer deit eva efficientnet resnet"
  else families="convnext dinov2 beit swin segformer"; fi
  ver=$(PYTHONPATH="$path" python -c "import $lib; print($lib.__version__)")
  echo "## $lib $ver"
  PYTHONPATH="$path" python benchmarks/census.py --library "$lib" --checks --only $families \
    --json "$tmp/$lib-$ver.json"
done
python - "$out" "$tmp"/*.json <<'PY'
import json, pathlib, sys
rows = []
for path in sys.argv[2:]:
    release = pathlib.Path(path).stem.replace("-", " ")
    rows += [dict(r, library=release) for r in json.loads(pathlib.Path(path).read_text())]
pathlib.Path(sys.argv[1]).write_text(json.dumps(rows, indent=1) + "\n")
PY
rm -r "$tmp"

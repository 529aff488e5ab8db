#!/usr/bin/env bash
# Regenerates proto/dispatch/v1/__init__.py and proto/message_pool.py from dispatch.proto.
# The generated files are committed and never edited by hand. The compiler's minor version must
# match the betterproto2 runtime pinned in pyproject.toml (0.10.x); a test checks the round trip.
#   pip install -e '.[dev]' && proto/regenerate.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Messages only: no client stub, no server base. Both ends drive the raw grpclib stream themselves
# (the grpc_bridge modules), and either generated class would make every module that imports the
# messages import grpclib too, past the rule that only the bridges touch it (a test checks).
python -m grpc_tools.protoc -I "$here" \
  --python_betterproto2_out="$out" \
  --python_betterproto2_opt=client_generation=none,server_generation=none \
  "$here/dispatch/v1/dispatch.proto"
cp "$out/dispatch/v1/__init__.py" "$here/dispatch/v1/__init__.py"
cp "$out/message_pool.py" "$here/message_pool.py"
: > "$here/dispatch/__init__.py"
echo "regenerated $(grep -c '^class ' "$here/dispatch/v1/__init__.py") classes into $here/dispatch/v1/__init__.py"

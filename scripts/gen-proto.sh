#!/usr/bin/env bash
# Regenerate the protobuf messages of the config protocol.
# Source: ztunnel/api/proto/meshfed.proto. Output: ztunnel/api/proto/meshfed_pb2.py.
# The generated module lives in ztunnel/ because both sides import it and the data plane may not
# import federation (import-linter); federation may import ztunnel. Services are bound with
# grpc's generic handlers (no *_pb2_grpc.py), so there is one generated module.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I ztunnel/api/proto --python_out=ztunnel/api/proto ztunnel/api/proto/meshfed.proto
echo "generated ztunnel/api/proto/meshfed_pb2.py"

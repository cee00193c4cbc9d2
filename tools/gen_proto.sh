#!/usr/bin/env bash
# Regenerate the committed gRPC stubs in jdisagg/v1/ from proto/. Run from anywhere; needs grpcio-tools.
# The -I root makes the generated imports read `from jdisagg.v1 import ...`, matching the package layout.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/jdisagg/v1/jdisagg.proto proto/jdisagg/v1/worker.proto

"""Generated gRPC stubs of the ``jdisagg.v1`` API.

Source: ``proto/jdisagg/v1/jdisagg.proto``; regenerate with ``tools/gen_proto.sh``.
"""

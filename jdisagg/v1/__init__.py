"""Generated gRPC stubs of the ``jdisagg.v1`` API (``proto/jdisagg/v1/jdisagg.proto``; ``tools/gen_proto.sh``)."""

"""The OpenAI-compatible HTTP API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``)
over the same ``Engine`` as the gRPC service, so SDKs, gateways and eval harnesses can talk to jdisagg."""

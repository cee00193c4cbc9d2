"""The gRPC front end of an ``Engine``: wire conversion, the service, the server process, client helpers.

Nothing here is imported by ``jdisagg`` itself, so the engine stays usable without gRPC on the path.
"""

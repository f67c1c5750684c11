"""The server's gRPC surface: asyncio servicers, the RPC handlers behind them, the interceptor
that checks every caller (certificate, role, limits), and the sum download stream."""

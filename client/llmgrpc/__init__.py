"""llmgrpc: a gRPC client for LLMs served by llmgrpc-server (no vLLM or torch needed)."""

from llmgrpc.client import AdminClient, AsyncClient, Client, Security

__all__ = ["AdminClient", "AsyncClient", "Client", "Security"]

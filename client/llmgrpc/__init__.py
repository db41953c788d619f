"""llmgrpc: a gRPC client for LLMs served by llmgrpc-server (no vLLM or torch needed)."""

from llmgrpc.client import AsyncClient, Client, Security

__all__ = ["AsyncClient", "Client", "Security"]

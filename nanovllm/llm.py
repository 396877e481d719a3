from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """``LLM(model_path, **config).generate(prompts, sampling_params)``."""

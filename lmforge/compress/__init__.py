"""Model compression: quantization (RTN, GPTQ, NF4, LLM.int8(), SmoothQuant) and, beside it,
pruning, low-rank factorisation and distillation (seed 002, 5.4; seed 001)."""

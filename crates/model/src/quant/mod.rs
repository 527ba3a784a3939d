//! Quantized weight matrices (GGUF block formats) and their matrix products. (in progress)

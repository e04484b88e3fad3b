"""The run-time engine: a Llama-family decoder with a static KV cache whose one-token step is captured
in a CUDA graph (`decoder`, `runner`), and `bench`, which times it on random weights of real shapes."""

from .decoder import SHAPES, Decoder, DecoderShape, from_hf
from .runner import DecodeRunner

__all__ = ["SHAPES", "DecodeRunner", "Decoder", "DecoderShape", "from_hf"]

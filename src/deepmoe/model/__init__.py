"""The DeepSeek model family: MLA/MHA attention, RoPE/YaRN, decoder with MTP, generation, and models
from checkpoint files and back."""

from deepmoe.model.attention import KVCache, MultiHeadAttention, MultiHeadLatentAttention, build_attention
from deepmoe.model.decoder import CausalLMOutput, DecoderLayer, DeepSeekForCausalLM, MTPModule
from deepmoe.model.generate import SpeculativeStats, generate, generate_speculative, sample_next
from deepmoe.model.norm import RMSNorm
from deepmoe.model.pretrained import save_pretrained

from_pretrained = DeepSeekForCausalLM.from_pretrained

__all__ = [
    "CausalLMOutput",
    "DecoderLayer",
    "DeepSeekForCausalLM",
    "KVCache",
    "MTPModule",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "RMSNorm",
    "SpeculativeStats",
    "build_attention",
    "from_pretrained",
    "generate",
    "generate_speculative",
    "sample_next",
    "save_pretrained",
]

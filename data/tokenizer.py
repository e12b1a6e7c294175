"""The GPT-2 tokenizer (tiktoken "r50k_base"), with the document convention of the FineWeb shards.

EOT and VOCAB_SIZE are the repo's one definition of GPT-2's constants; tiktoken is imported only
when the encoding itself is needed, so reading the constants needs nothing but numpy.
"""

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tiktoken

ENCODING_NAME = "r50k_base"  # tiktoken's name for the GPT-2 BPE ranks; "gpt2" is the same encoding
EOT = 50256  # <|endoftext|>; it precedes every document, so it doubles as BOS
VOCAB_SIZE = 50257  # ids 0..50256; the model pads its tables past this, so larger ids are not text


class TokenizerUnavailable(RuntimeError):
    """The GPT-2 vocabulary could not be loaded (typically: no internet and no tiktoken cache)."""


@functools.cache
def gpt2_encoding() -> "tiktoken.Encoding":
    """The GPT-2 encoding, loaded once per process."""
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as err:  # tiktoken fails with network, file or hash errors alike
        raise TokenizerUnavailable(
            f"could not load the GPT-2 vocabulary (tiktoken {ENCODING_NAME!r}: {type(err).__name__}); "
            f"connect to the internet once so tiktoken caches it, or set TIKTOKEN_CACHE_DIR to a folder "
            f"holding the {ENCODING_NAME} file"
        ) from err


def encode_documents(texts: Sequence[str]) -> np.ndarray:
    """Tokenize `texts` as documents: [EOT, *doc0, EOT, *doc1, ...] as uint16 (special tokens are text)."""
    encoding = gpt2_encoding()
    eot = np.array([EOT], dtype=np.uint32)
    # With no special token allowed or disallowed this is encode_ordinary, without building a list.
    parts = [part for text in texts for part in (eot, encoding.encode_to_numpy(text, disallowed_special=()))]
    return np.concatenate(parts).astype(np.uint16) if parts else np.empty(0, dtype=np.uint16)

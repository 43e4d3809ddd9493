"""Oracles the tests share.

Example:
    >>> from _oracles import greedy_under_full_forward
    >>> greedy_under_full_forward(model, prompt, new_tokens)  # what greedy decoding picks
"""

import jax
import jax.numpy as jnp
import numpy as np


def greedy_under_full_forward(forward, prompt, new, lengths=None) -> np.ndarray:
    """The greedy tokens a causal LM's own full forward picks, teacher-forced on ``new``.

    Row i is its prompt's first ``lengths[i]`` tokens, then ``new[i]``, then zeros: the model is
    causal, so position lengths[i] - 1 + j sees exactly the prompt and new[i, :j], and greedy
    decoding means new[i, j] is the argmax there. One forward call (one compile) checks every
    row and step, whatever the prompts' lengths."""
    prompt, new = np.asarray(prompt), np.asarray(new)
    b, t = prompt.shape
    n = new.shape[1]
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    seq = np.zeros((b, t + n), np.int32)
    for i, k in enumerate(lengths):
        seq[i, :k], seq[i, k:k + n] = prompt[i, :k], new[i]
    logits = np.asarray(jax.jit(forward)(jnp.asarray(seq)))
    return np.stack([logits[i, k - 1:k - 1 + n].argmax(-1) for i, k in enumerate(lengths)])

"""The reference for generated tokens' log-probabilities: log_softmax of a full forward's logits."""

import torch


def assert_logprobs_match(reference_logits, completion, top, tol=None):
    """completion.logprobs[j] = log_softmax(reference_logits[j])[token j] and, per token, the `top`
    most likely tokens with their log-probabilities (ids compared through their values: ties)."""
    tol = tol or dict(rtol=1e-4, atol=1e-5)
    ref = torch.log_softmax(reference_logits, dim=-1)                  # [n, V]: row j -> token j
    n = len(completion.tokens)
    assert len(completion.logprobs) == n
    torch.testing.assert_close(torch.tensor(completion.logprobs),
                               ref[torch.arange(n), completion.tokens], **tol)
    assert len(completion.top_logprobs) == (n if top else 0)
    for row, alternatives in zip(ref, completion.top_logprobs):
        ids, values = list(alternatives), list(alternatives.values())
        torch.testing.assert_close(torch.tensor(values), torch.topk(row, top).values, **tol)
        torch.testing.assert_close(torch.tensor(values), row[ids], **tol)

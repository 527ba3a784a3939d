//! FlashAttention-style CPU attention and the log-sum-exp merge. (in progress)

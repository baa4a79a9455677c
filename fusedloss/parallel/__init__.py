"""Vocab-parallel losses on torch.distributed: each rank holds a contiguous slice of the classes
(tensor-parallel LM heads split the vocabulary), and every rank gets the loss of the whole row.
Reached through the public functions' ``process_group=`` argument (and a DTensor input).

Bottom up: protocol (the header every rank checks before the call's collectives), combine
(the slice statistics and their float64 combination in rank order), cross_entropy,
linear (the fused linear cross-entropy over a row-split LM head), dtensor (the DTensor adapter).
"""

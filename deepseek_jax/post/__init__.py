"""Post-training: SFT on chat data with isolated packed samples, and GRPO with rule rewards.

The pure layers (no trainer state, no model calls) that the SFT config and the GRPO loop are
built on (docs/post_training.md):
    chat       chat templates (tokenizer_config.json via jinja2, or the byte tokenizer's built-in
               one) and the loss mask of a conversation, derived by prefix diff of renders
    sft_data   messages JSONL and prompt/completion JSONL -> tokenized samples
    packing    several samples per row, isolated: segment ids, positions restarting per sample,
               targets (every MTP depth included) never crossing a sample
    tasks      deterministic synthetic chat tasks with a held-out split
    grpo       group-normalised advantages, the k3 KL estimator, the clipped surrogate, the
               paper's aggregation
    rewards    rule rewards: exact-answer accuracy and the <think>/<answer> format

Sits beside data/ in the import graph: imports data/, batch.py, errors.py and model/, never
train/.
"""

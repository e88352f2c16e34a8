"""The DeepSeek-V3 model in Flax NNX: MLA, DeepSeekMoE, MTP, and the training objective.

Never imports train/, parallel/, data/, infer/ or configs/. Layers take the small config they need
(`config.MLAConfig`, `MoEConfig`, ...); the routed experts are an explicit `dispatch.ExpertFn`
argument and activation constraints a no-op hook (`constraints`) unless a caller installs one.

Dimension legend: every activation and weight name carries its shape as a suffix, e.g. `x_BSD`,
`logits_BSY`, `w1_EDF`. Upper case is a size, lower case a per-rank or per-token count.

  B  batch rows                        S  query positions        T  key positions
  D  d_model (only that)               H  attention heads        Y  vocabulary
  N  qk nope head dim                  R  qk rope head dim       K  qk head dim, N + R
  V  value head dim                    O  wkv_b output per head, N + V
  Q  q-LoRA rank                       C  kv-LoRA rank           A  wkv_a output, C + R
  F  dense or expert FFN dim           E  routed experts         G  expert groups
  k  experts per token (top-k)         g  groups kept per token (topk_group)
  X  tokens flattened, B * S           Z  (token, choice) rows sorted by expert, X * k
  c  tokens per chunk (head_loss)
  e  routed experts local to one expert-parallel rank (E / U)
  U  expert-parallel ranks             W  rows per destination in an all-to-all buffer
  L  layers                            J  MTP depth (modules)    I  logged steps (plot.py)
  P  pipeline ranks                    M  micro-batches per step

"Stage" means one thing: a model stage of the pipeline, a contiguous slice of the MoE layers (the
first also runs the embedding and dense layers, the last the head, loss and MTP). A pipeline rank
(one position of the `pipe` mesh axis, P of them) holds one stage (1F1B, GPipe) or two (DualPipe,
DualPipeV: its chunks c = 0, 1); `num_stages` is P, or 2P for DualPipeV.
"""

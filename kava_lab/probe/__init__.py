"""Probing a trained student: what do the latents hold? (kava-method.md §7, claim (d)).

Four views of the M latent slots of a trained student, all computed from one :class:`ProbeData` bundle
that :func:`collect` fills in a few batched passes over held-out problems:

- **decoded latents** (:func:`decode_latents`): every slot's last-layer hidden state at every Jacobi
  iteration (prefill included) through the final norm and the LM head; top-k tokens with probabilities,
  and whether the top token occurs in the teacher's CoT for that problem (and, as a control, in the CoT of
  another problem). In transformers 5 ``hidden_states[-1]`` is already after the final norm for Llama,
  Qwen2 and GPT-2; :func:`last_hidden_is_normed` checks it on the model itself instead of assuming it.
- **KV alignment** (:func:`kv_alignment`): per layer, the cosine similarity between the student's latent
  K (and V) slot ``i`` and the compressed teacher slot ``j``, per KV head then averaged over heads, as an
  ``M x M`` matrix; the *diagonal score* (mean diagonal minus mean off-diagonal over valid slots) sums it
  up. The control pairs each student with another problem's teacher cache: what is left there is position
  (RoPE) structure, not content. :func:`value_reach` asks how *close* each slot's values come to their
  target, against the content-free floor (the other problems' mean target), per layer and slot.
- **trajectories** (:func:`project_trajectory`): latent hidden states of all slots and iterations projected
  on their top principal components (SVD), so one sees how the Jacobi iterations move the latents;
  :func:`iteration_deltas` measures how much each iteration still changes them.
- **linear probes** (:func:`linear_probes`): from the hidden state of every layer at every latent slot
  (final latent pass, re-run with all hidden states by :func:`latent_hidden_states`), predict each
  step's intermediate result (``Example.step_values``) on held-out problems, next to a shuffled-label
  control and the majority-class rate. The default target is the *last digit* of the value (10 classes):
  the tiny tokenizer writes every digit as its own token, so the last digit is a quantity the model must
  represent to write the number, its classes are balanced enough for accuracy to mean something, and a
  raw-value regression would be dominated by the few large values (``target="log_value"`` does ridge
  regression on ``log(1 + value)`` and reports R²). Probes are closed-form ridge (one-vs-rest on one-hot
  targets for classes), batched over every (layer, slot), with the ridge strength chosen per probe by
  exact leave-one-out on the training problems.

Modules: :mod:`.lens` (final norm, head, logit lens, decoded latents), :mod:`.collect` (:class:`ProbeData`),
:mod:`.align` (KV alignment), :mod:`.trajectory`, :mod:`.linear` (ridge probes). Their figures are in
:mod:`kava_lab.viz` (``viz.fig_*``); :func:`kava_lab.runs.demo_run` trains or reuses a short tiny run for
notebooks called without a run folder.

Shapes: ``B`` examples, ``L`` layers, ``H`` KV heads, ``M`` slots, ``d`` head dim, ``D`` hidden size,
``I`` iterations (Jacobi: prefill + T passes; sequential: 1), ``K`` probe targets (steps + answer).
"""

from __future__ import annotations

from .align import KVAlignment, ValueReach, diagonal_score, kv_alignment, kv_cosine, value_reach
from .collect import ProbeData, collect, latent_hidden_states, trajectory_tensor
from .lens import LatentDecoding, decode_latents, final_norm, last_hidden_is_normed, lm_head, logit_lens, unwrap_model
from .linear import TARGETS, ProbeResult, linear_probes, probe_targets, ridge_fit_predict
from .trajectory import TrajectoryProjection, iteration_deltas, project_trajectory

__all__ = [
    "unwrap_model", "final_norm", "lm_head", "last_hidden_is_normed", "logit_lens",
    "ProbeData", "collect", "latent_hidden_states", "trajectory_tensor",
    "LatentDecoding", "decode_latents",
    "kv_cosine", "diagonal_score", "KVAlignment", "kv_alignment", "ValueReach", "value_reach",
    "TrajectoryProjection", "project_trajectory", "iteration_deltas",
    "ProbeResult", "probe_targets", "ridge_fit_predict", "linear_probes", "TARGETS",
]

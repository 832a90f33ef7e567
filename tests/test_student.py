"""The student's latent loops and decoding against references written from kava-method.md §2.

Each reference recomputes everything from scratch (fresh caches, full sequences), so it shares no code path
with ``Student`` beyond the model itself: a broken Jacobi shift, a lost cache fork, or padding that leaks
between rows makes these tests fail. Tiny random Llama with GQA, no downloads.
"""

import pytest
import torch

from kava_lab.backbone import TinyConfig, build_tiny, forward_cached, load_backbone
from kava_lab.config import LatentConfig
from kava_lab.encoding import Collator, encode, without_answer
from kava_lab.student import Student, greedy_decode, stack_kv
from kava_lab.synthetic import make_synthetic

SMALL = TinyConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    torch.manual_seed(0)
    return load_backbone(str(build_tiny(tmp_path_factory.mktemp("llama"), SMALL, family="llama")))


def _student(bb, mode="jacobi", M=3, T=2):
    torch.manual_seed(1)
    return Student(bb.model, LatentConfig(mode=mode, M=M, T=T), eos_id=bb.eos_id, eot_id=bb.eot_id).eval()


def _batch(bb, M, n=3, answer=False):
    examples = make_synthetic(n, split="test", trace="nl", min_steps=2, max_steps=4)  # questions differ in length
    items = [encode(e, bb.tokenizer, with_cot=False) for e in examples]
    if not answer:
        items = [without_answer(it) for it in items]
    return Collator.for_backbone(bb)(items, "student", M=M)


def _question_cache(model, batch):
    P = batch.P
    return forward_cached(model, None, input_ids=batch.input_ids[:, :P], attention_mask=batch.attention_mask[:, :P],
                          position_ids=batch.position_ids[:, :P])[1]


@torch.no_grad()
def test_jacobi_matches_a_hand_rolled_loop(bb):
    M, T = 3, 2
    student = _student(bb, M=M, T=T)
    batch = _batch(bb, M)
    P, ids, am, pos = batch.P, batch.input_ids, batch.attention_mask, batch.position_ids
    model, proj = bb.model, student.projection
    # prefill [question, <bot>, <latent> x M]; shifted init z_1 = P(h_bot), z_i = P(h_latent_{i-1})
    h = model(input_ids=ids[:, :P + M], attention_mask=am[:, :P + M], position_ids=pos[:, :P + M],
              output_hidden_states=True).hidden_states[-1]
    z = proj(torch.stack([h[:, P - 1 + i] for i in range(M)], 1))
    for t in range(T):  # each pass on a freshly computed question cache
        out, cache = forward_cached(model, _question_cache(model, batch), inputs_embeds=z,
                                    attention_mask=am[:, :P + M], position_ids=pos[:, P:P + M],
                                    output_hidden_states=True)
        o = out.hidden_states[-1]
        if t < T - 1:
            z = torch.cat([z[:, :1]] + [proj(o[:, i:i + 1]) for i in range(M - 1)], 1)  # z_1 stays, z_{i+1} = P(o_i)
    ref_k, ref_v = stack_kv(cache, P, P + M)
    state = student.latent_loop(batch)
    assert state.forward_passes == 1 + T
    assert torch.allclose(state.latents, z, atol=1e-5)
    k, v = stack_kv(state.cache, P, P + M)
    assert torch.allclose(k, ref_k, atol=1e-5) and torch.allclose(v, ref_v, atol=1e-5)
    assert state.cache.get_seq_length() == P + M  # the last pass's cache, question columns untouched


@torch.no_grad()
def test_t0_is_pause_tokens(bb):
    M = 3
    student = _student(bb, M=M, T=0)
    batch = _batch(bb, M)
    P = batch.P
    _, ref = forward_cached(bb.model, None, input_ids=batch.input_ids[:, :P + M],
                            attention_mask=batch.attention_mask[:, :P + M], position_ids=batch.position_ids[:, :P + M])
    state = student.latent_loop(batch)
    assert state.forward_passes == 1
    for a, b in zip(stack_kv(state.cache, P, P + M), stack_kv(ref, P, P + M)):
        assert torch.allclose(a, b, atol=1e-6)


@torch.no_grad()
def test_sequential_matches_re_encoding_every_step_from_scratch(bb):
    M = 3
    student = _student(bb, mode="sequential", M=M)
    batch = _batch(bb, M)
    P, ids, am, pos = batch.P, batch.input_ids, batch.attention_mask, batch.position_ids
    model, proj = bb.model, student.projection
    prefix = model.get_input_embeddings()(ids[:, :P])  # [question, <bot>]
    latents = []
    h = model(inputs_embeds=prefix, attention_mask=am[:, :P], position_ids=pos[:, :P],
              output_hidden_states=True).hidden_states[-1][:, -1:]
    for i in range(M):  # z_{i+1} = P(h_i), every step re-encoded without a cache
        latents.append(proj(h))
        x = torch.cat([prefix] + latents, 1)
        h = model(inputs_embeds=x, attention_mask=am[:, :P + i + 1], position_ids=pos[:, :P + i + 1],
                  output_hidden_states=True).hidden_states[-1][:, -1:]
    state = student.latent_loop(batch)
    assert state.forward_passes == 1 + M
    assert torch.allclose(state.latents, torch.cat(latents, 1), atol=1e-5)


@torch.no_grad()
def test_generate_first_token_matches_one_uncached_forward(bb):
    M, T = 3, 2
    student = _student(bb, M=M, T=T)
    batch = _batch(bb, M)
    P, ids, am, pos = batch.P, batch.input_ids, batch.attention_mask, batch.position_ids
    gen = student.generate(batch, max_new_tokens=3)
    state = student.latent_loop(batch)
    emb = bb.model.get_input_embeddings()
    x = torch.cat([emb(ids[:, :P]), state.latents, emb(ids[:, P + M:])], 1)  # [q, bot, z, eot, prompt]
    logits = bb.model(inputs_embeds=x, attention_mask=am, position_ids=pos).logits
    last = am.shape[1] - 1 - am.flip(1).argmax(1)  # each row's last real token
    first = logits[torch.arange(len(batch)), last].argmax(-1)
    for i in range(len(batch)):
        want = int(first[i])
        got = gen.tokens[i][0] if gen.tokens[i] else bb.eos_id
        assert got == want, (i, got, want)
    assert (gen.forward_passes >= 1 + T + 1).all()


@torch.no_grad()
def test_greedy_decode_is_batch_independent_with_padding_and_stops_at_eos(bb):
    examples = make_synthetic(3, split="test", trace="nl", min_steps=2, max_steps=4)
    items = [without_answer(encode(e, bb.tokenizer)) for e in examples]  # CoT + prompt: rows differ on both sides
    collate = Collator.for_backbone(bb)
    batch = collate(items, "teacher")
    assert (batch.attention_mask[:, 0] == 0).any() and (batch.attention_mask[:, -1] == 0).any()  # left and right pads
    model = bb.model
    together = greedy_decode(model, None, batch.input_ids, batch.attention_mask, batch.position_ids, bb.eos_id, 5)
    for i, it in enumerate(items):
        alone_b = collate([it], "teacher")
        alone = greedy_decode(model, None, alone_b.input_ids, alone_b.attention_mask, alone_b.position_ids,
                              bb.eos_id, 5)
        assert together.tokens[i] == alone.tokens[0], i
    # early eos: call row r's first token the eos; row r stops after one pass, rows that never emit it go on
    r = next(i for i, t in enumerate(together.tokens) if t)
    eos = together.tokens[r][0]
    stopped = greedy_decode(model, None, batch.input_ids, batch.attention_mask, batch.position_ids, eos, 5)
    assert stopped.tokens[r] == [] and int(stopped.lengths[r]) == 1 and int(stopped.forward_passes[r]) == 1
    ran_on = [i for i in range(3) if i != r and len(together.tokens[i]) == 5 and eos not in together.tokens[i]]
    for i in ran_on:
        assert stopped.tokens[i] == together.tokens[i] and int(stopped.lengths[i]) == 5


def test_batch_with_another_M_than_the_student_is_refused(bb):
    """Batch.M drives the loop and LatentConfig.M sizes the student: a mismatch is an error, not a silent run."""
    student = _student(bb, M=3)
    with pytest.raises(ValueError, match="4 latent columns .* LatentConfig.M is 3"):
        student.latent_loop(_batch(bb, M=4))


def test_soft_token_input_is_the_predicted_embedding_mixture(bb):
    """latent.input=soft_token: the next pass's inputs are softmax(lm_head(h) / tau) @ E, written out here from
    the model's logits, and the answer CE reaches them (no projection parameters)."""
    M, T = 3, 2
    torch.manual_seed(1)
    student = Student(bb.model, LatentConfig(M=M, T=T, input="soft_token", tau=0.5), eos_id=bb.eos_id,
                      eot_id=bb.eot_id).eval()
    assert list(student.projection.parameters()) == []  # the backbone is not registered a second time
    batch = _batch(bb, M)
    P, ids, am, pos = batch.P, batch.input_ids, batch.attention_mask, batch.position_ids
    with torch.no_grad():
        out = bb.model(input_ids=ids[:, :P + M], attention_mask=am[:, :P + M], position_ids=pos[:, :P + M])
        expected = torch.softmax(out.logits[:, P - 1:P + M - 1] / 0.5, -1) @ bb.model.get_input_embeddings().weight
        state = student.latent_loop(batch, record=True)
    first = state.trajectory[1]["inputs"]  # [B, M, D], the first Jacobi pass's inputs
    rows = am[:, P - 1].bool()
    assert torch.allclose(first[rows], expected[rows], atol=1e-5)
    assert not torch.allclose(first, torch.zeros_like(first))

    student.train()
    trained = student(_batch(bb, M, answer=True))
    (grad,) = torch.autograd.grad(trained.ce, [trained.latents])  # the answer reads the soft-token inputs
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="latent.input"):
        Student(bb.model, LatentConfig(input="hidden"), eos_id=bb.eos_id, eot_id=bb.eot_id)
    with pytest.raises(ValueError, match="latent.tau"):
        Student(bb.model, LatentConfig(input="soft_token", tau=0.0), eos_id=bb.eos_id, eot_id=bb.eot_id)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forced_pass_reads_the_question_the_given_earlier_slots_and_itself(tiny_backbone, attn):
    """Student.forced_pass (loss.a_tf): slot j's K/V equal a plain causal pass of latent j alone over
    [question, <bot>, given slots < j], in both attention implementations; later given slots and other slots'
    latent inputs do not reach it."""
    import copy

    from kava_lab.intervene import write_latents
    from kava_lab.student import Student, fork_cache, stack_kv

    b = copy.copy(tiny_backbone)
    b.model = copy.deepcopy(tiny_backbone.model)
    b.model.config._attn_implementation = attn
    M = 4
    items = [encode(e, b.tokenizer) for e in make_synthetic(3, trace="nl", min_steps=2, max_steps=4, seed=5)]
    sb = Collator.for_backbone(b)(items, "student", M=M)
    student = Student(b.model, LatentConfig(mode="jacobi", M=M, T=1), b.eos_id, b.eot_id).eval()
    P = sb.P
    torch.manual_seed(0)
    with torch.no_grad():
        state = student.latent_loop(sb)
        question = fork_cache(state.cache)
        question.crop(-M)  # [question, <bot>]: P columns
        keys, values = stack_kv(state.cache, P, P + M)
        given_k, given_v = torch.randn_like(keys), torch.randn_like(values)  # any slots: not the student's own
        latents = torch.randn_like(state.latents)

        def forced(gk, gv, z):
            cache = fork_cache(question)
            write_latents(cache, P, M, gk, gv)
            return student.forced_pass(sb, cache, z)

        fk, fv = forced(given_k, given_v, latents)
        assert fk.shape == keys.shape and fv.shape == values.shape
        for j in range(M):  # reference: latent j alone after the given slots < j
            cache = fork_cache(question)
            if j:
                write_latents(cache, P, j, given_k[:, :, :, :j], given_v[:, :, :, :j])
            _, cache = forward_cached(b.model, cache, inputs_embeds=latents[:, j:j + 1],
                                      attention_mask=sb.attention_mask[:, :P + j + 1],
                                      position_ids=sb.position_ids[:, P + j:P + j + 1])
            rk, rv = stack_kv(cache, P + j, P + j + 1)
            assert torch.allclose(fk[:, :, :, j:j + 1], rk, atol=1e-5), j
            assert torch.allclose(fv[:, :, :, j:j + 1], rv, atol=1e-5), j
        later_k = given_k.clone()
        later_k[:, :, :, 2:] += 1.0  # given slots >= 2 changed: slots 0-2 write the same
        other = latents.clone()
        other[:, 3] += 1.0  # latent 3's input changed: slots 0-2 write the same
        for gk, z in ((later_k, latents), (given_k, other)):
            k2, v2 = forced(gk, given_v, z)
            assert torch.allclose(k2[:, :, :, :3], fk[:, :, :, :3], atol=1e-6)
            assert torch.allclose(v2[:, :, :, :3], fv[:, :, :, :3], atol=1e-6)
        assert not torch.allclose(forced(later_k, given_v, latents)[0][:, :, :, 3], fk[:, :, :, 3])
        with pytest.raises(ValueError, match="forced_pass"):
            student.forced_pass(sb, fork_cache(question), latents)


def test_forward_passes_use_the_installed_cache_keyword(bb):
    """transformers renamed forward's ``past_key_values`` to ``cache`` (the old name warns, then goes in 5.40):
    the latent loop (both modes), the answer pass, decoding and teacher extraction call the model under the
    name it declares, so no deprecation warning fires (fails if any call site passes the old name)."""
    import warnings

    from kava_lab.teacher import extract_teacher

    teacher_batch = Collator.for_backbone(bb)(
        [encode(e, bb.tokenizer) for e in make_synthetic(2, split="test", trace="nl", min_steps=2, max_steps=3)],
        "teacher")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        for mode in ("jacobi", "sequential"):
            student = _student(bb, mode=mode)
            student(_batch(bb, 3, answer=True))
            student.generate(_batch(bb, 3), max_new_tokens=2)
        extract_teacher(bb.model, teacher_batch)


def test_t_min_draws_iterations_in_training_only(bb):
    """latent.T_min: a training-mode loop runs a drawn number of Jacobi passes in T_min..T (every value
    reached, the draw reproducible from torch's seed); evaluation always runs T; bad settings are refused."""
    student = Student(bb.model, LatentConfig(M=3, T=4, T_min=2), eos_id=bb.eos_id, eot_id=bb.eot_id)
    batch = _batch(bb, 3, answer=True)
    student.train()
    torch.manual_seed(5)
    drawn = [student.latent_loop(batch).forward_passes - 1 for _ in range(24)]
    assert set(drawn) == {2, 3, 4}
    torch.manual_seed(5)
    assert [student.latent_loop(batch).forward_passes - 1 for _ in range(24)] == drawn
    student.eval()
    assert {student.latent_loop(batch).forward_passes - 1 for _ in range(5)} == {4}
    for bad in (dict(T=3, T_min=4), dict(T=3, T_min=0), dict(mode="sequential", T_min=1)):
        with pytest.raises(ValueError, match="T_min"):
            Student(bb.model, LatentConfig(M=3, **bad), eos_id=bb.eos_id, eot_id=bb.eot_id)

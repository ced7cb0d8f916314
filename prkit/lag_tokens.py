"""Where a concept's words sit in a prompt, as the text encoder sees it: the positions of its identifier and class
word (all sub-tokens, each subject's own class word), the weights LAG sums the cross-attention maps with
(``concept_weights``; SDXL's second prompt too), and the word tokens of a prompt for attention maps
(``prompt_tokens``, ``word_index``). ``prkit.lag`` re-exports them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .residuals import Residuals


def _word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False).input_ids


def token_positions(tokenizer, prompt: str, words: Sequence[str]) -> list[int]:
    """Positions, in the padded tokenized ``prompt``, of every sub-token of each of ``words``.

    Args:
        tokenizer: the pipeline itself (its textual-inversion rewrite applied to prompt and words), or a tokenizer.
    Returns:
        sorted positions (empty when none of the words occur).
    Raises:
        ValueError: a tokenizer is given and the prompt holds a token that the pipeline would expand.
    """
    tokenizer, convert = _as_encoded(tokenizer, prompt, "prkit.lag.token_positions(pipe, prompt, words)")
    ids = _padded(tokenizer, convert(prompt)).input_ids
    found: set[int] = set()
    for word in words:
        for start, end in _occurrences(tokenizer, ids, convert(word)):
            found.update(range(start, end))
    return sorted(found)


def _occurrences(tokenizer, ids: list[int], word: str) -> list[tuple[int, int]]:
    """(start, end) of every whole-word occurrence of ``word``'s tokens in the token ids ``ids``."""
    sub = _word_ids(tokenizer, word)
    return [(start, start + len(sub)) for start in _starts(ids, sub) if _begins_a_word(tokenizer, ids, start, sub)]


CLASS_WORD_REACH = 3  # tokens that may stand between an identifier and its class word ("sks dog", "sks red dog")


def _own_class_word(tokenizer, ids: list[int], identifiers: list[tuple[int, int]], starts: list[int],
                    class_word: str) -> list[int]:
    """Positions of the class word that belongs to each of a concept's ``identifiers`` (start, end): its first
    occurrence after the identifier, at most ``CLASS_WORD_REACH`` tokens on and before the next identifier of any
    concept (``starts``). Another copy of the class word ("a sks dog next to a zwx dog", "... next to the dog") is
    another subject's."""
    found: list[int] = []
    words = _occurrences(tokenizer, ids, class_word)
    for _, end in identifiers:
        stop = min([s for s in starts if s >= end] + [end + CLASS_WORD_REACH + 1])
        own = next(((a, b) for a, b in words if end <= a < stop), None)
        if own is not None:
            found.extend(range(*own))
    return found


def _padded(tokenizer, prompt: str):
    """``prompt`` tokenized as the pipeline does for its text encoder: padded to the model length, cut there."""
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)


def _begins_a_word(tokenizer, ids: list[int], start: int, sub: list[int]) -> bool:
    """Whether the match of ``sub`` at ``start`` is a whole word, not the tail of a longer one ("sks" in "xsks").

    CLIP's BPE marks the last piece of every word with ``</w>``: a word begins after such a piece, a special token
    or an added one (a textual-inversion token). Vocabularies without that mark are not checked.
    """
    if start == 0 or not str(tokenizer.convert_ids_to_tokens(sub[-1])).endswith("</w>"):
        return True
    before = ids[start - 1]
    text = str(tokenizer.convert_ids_to_tokens(before))
    return before in tokenizer.all_special_ids or text.endswith("</w>") or before in _added_ids(tokenizer)


def _added_ids(tokenizer) -> set[int]:
    """Ids of the tokens added to the vocabulary (textual inversion's), known by id: the text of one written with
    capitals ("<Sks>") comes back lowercased from ``convert_ids_to_tokens``, and is no key of ``get_added_vocab``."""
    return set(tokenizer.get_added_vocab().values())


def _as_encoded(tokenizer, prompt: str, call: str) -> tuple:
    """The tokenizer that reads ``prompt`` and the rewrite the pipeline applies first, given a pipeline (an SDXL
    refiner has only its second tokenizer) or a tokenizer; a tokenizer is refused for a prompt holding a token that
    the pipeline would expand (``<t>`` -> ``<t> <t>_1``): positions counted without that rewrite are shifted."""
    if hasattr(tokenizer, "encode_prompt"):
        pipe = tokenizer
        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        return tokenizer, encoded_text(pipe, tokenizer)
    added = tokenizer.get_added_vocab()
    expanded = [t for t in tokenizer.tokenize(prompt) if t in added and f"{t}_1" in added]
    if expanded:
        raise ValueError(f"prompt {prompt!r} holds the multi-vector textual-inversion token {expanded[0]!r}, "
                         f"which the pipeline expands before its text encoder; pass the pipeline, {call}, "
                         "for the positions the text encoder sees")
    return tokenizer, lambda text: text


class TokenLabel(str):
    """A token's label (its text without CLIP's end-of-word mark ``</w>``) that remembers whether the token ends a
    word (``ends_word``; None: not known), so that ``word_index`` matches whole words; it compares, prints and
    saves as the plain string."""

    ends_word: bool | None

    def __new__(cls, text: str, ends_word: bool | None = None):
        label = super().__new__(cls, text)
        label.ends_word = ends_word
        return label


def prompt_tokens(tokenizer, prompt: str) -> tuple[list[int], list[str]]:
    """The word tokens of ``prompt`` as the text encoder sees them: their positions in the padded sequence and labels.

    Start, end and padding are left out, so the positions are right whichever side the tokenizer pads on
    (``padding_side`` "left" puts the words at the end). Use the positions as ``AttentionStore(tokens=...)``. The
    labels are ``TokenLabel`` strings: they know which tokens end a word, for ``word_index``.

    Args:
        tokenizer: the pipeline itself (its tokenizer, with the rewrite its ``encode_prompt`` applies: a multi-vector
            textual-inversion token ``<t>`` becomes ``<t> <t>_1 ...``), or a tokenizer.
    Raises:
        ValueError: a tokenizer is given and the prompt holds a token that the pipeline would expand.
    """
    tokenizer, convert = _as_encoded(tokenizer, prompt, "prkit.prompt_tokens(pipe, prompt)")
    enc = _padded(tokenizer, convert(prompt))
    ids, mask = enc.input_ids, enc.attention_mask
    ends = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    positions = [i for i, (t, m) in enumerate(zip(ids, mask)) if m and t not in ends]
    texts = [str(t) for t in tokenizer.convert_ids_to_tokens([ids[i] for i in positions])]
    marked = any(t.endswith("</w>") for t in texts)  # a vocabulary without CLIP's mark: word ends not known
    added = _added_ids(tokenizer)
    labels = [TokenLabel(t.replace("</w>", ""), (t.endswith("</w>") or ids[i] in added) if marked else None)
              for i, t in zip(positions, texts)]
    return positions, labels


def word_index(labels: Sequence[str], word: str) -> int:
    """The index in ``labels`` (``prompt_tokens``'s) of ``word``'s first piece: a word the tokenizer splits
    ("zwxq" -> "zw", "x", "q") is found by its pieces, and words separated by spaces (DreamBench's class "stuffed
    animal") by theirs in a row. Only whole words count, where the labels know where words end (``prompt_tokens``'s
    do; plain strings do not): "cat" is not the first pieces of "category" ("c", "a", "t", "e", ...), nor "at" the
    last piece of "cat". Letter case does not count: CLIP's tokenizer lowercases the prompt (an identifier written
    "TOK" is the label "tok"). Raises ValueError naming the labels when it is not there."""
    def ends(label) -> bool | None:
        return getattr(label, "ends_word", None)

    def spelled(start: int, text: str) -> int | None:
        """The index after the labels from ``start`` on that spell ``text`` up to a word's end (None: they do not)."""
        joined = ""
        for j in range(start, len(labels)):
            joined += labels[j].lower()
            if joined == text and ends(labels[j]) is not False:
                return j + 1
            if not text.startswith(joined) or ends(labels[j]):  # another word, or one that ends too soon
                return None
        return None

    parts = word.lower().split()
    for i in range(len(labels)):
        if i and ends(labels[i - 1]) is False:  # the tail of a word
            continue
        at: int | None = i
        for part in parts:
            at = spelled(at, part) if at is not None else None
        if parts and at is not None:
            return i
    raise ValueError(f"{word!r} is not among the prompt's tokens {list(labels)} as a whole word")


def _starts(ids: list[int], sub: list[int]) -> list[int]:
    """Where the token sequence ``sub`` occurs in ``ids``."""
    return [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]


def concept_weights(tokenizer, prompts: Sequence[str], concepts: Sequence[Residuals],
                    include_class: bool = True, convert: Callable[[str], str] | None = None,
                    require: bool = True) -> torch.Tensor:
    """Token weights (P, T, S): 1 at the positions of concept s's words in prompt p: its identifier, and with
    ``include_class`` the class word that follows it (``_own_class_word``: not a copy of the word naming another
    subject).

    Args:
        convert: how the pipeline rewrites a text before it tokenizes it (``encoded_text``); applied to prompts
            and words alike, so positions are those of the tokens the text encoder really sees.
        require: refuse a prompt without a concept's identifier (False: its weights stay zero; SDXL's second
            prompt may leave the concept out).
    Raises:
        ValueError: a prompt lacks a concept's identifier (LAG would have nothing to localize).
    """
    convert = convert or (lambda text: text)
    length = tokenizer.model_max_length
    weights = torch.zeros(len(prompts), length, len(concepts))
    for concept in concepts:
        if not concept.token:
            raise ValueError(f"residual set {concept.name!r} has no token; LAG needs the concept's identifier "
                             "(pass token=... to add_residuals/load_residuals, or sample with lag=False)")
    ids = [_padded(tokenizer, convert(prompt)).input_ids for prompt in prompts]
    identifiers = [[_occurrences(tokenizer, row, convert(concept.token)) for concept in concepts] for row in ids]
    starts = [sorted({a for occurrences in row for a, _ in occurrences}) for row in identifiers]
    shared = [[bool(spans) for spans in row] for row in identifiers]  # before _owned hands shared ones out
    for p, prompt in enumerate(prompts):  # an identifier several sets share goes to the set whose class word follows
        identifiers[p] = _owned(tokenizer, ids[p], identifiers[p], starts[p], concepts, convert, prompt)
    for s, concept in enumerate(concepts):
        for p, prompt in enumerate(prompts):
            encoded = convert(prompt)
            found = [i for a, b in identifiers[p][s] for i in range(a, b)]
            if found:
                if include_class and concept.class_word:  # its own class word, not another subject's
                    found += _own_class_word(tokenizer, ids[p], identifiers[p][s], starts[p],
                                             convert(concept.class_word))
                weights[p, found, s] = 1.0
            elif require and shared[p][s] and not concept.class_word:  # no class word: no occurrence is its own
                raise ValueError(f"residual set {concept.name!r} has no class word, and its identifier "
                                 f"{concept.token!r} is shared with another set, so LAG cannot tell its subject apart "
                                 f"in prompt {prompt!r}: give it one (prkit.get_residuals(pipe.unet, "
                                 f"{concept.name!r}).class_word = '...'), write it after its identifier, or sample "
                                 "without this set")
            elif require and shared[p][s]:
                raise ValueError(f"prompt {prompt!r} holds the identifier {concept.token!r} of residual set "
                                 f"{concept.name!r} only where another set that shares it has its class word after "
                                 f"it; write '{concept.token} {concept.class_word}' where this set's "
                                 "subject goes, or sample without this set")
            elif require:
                full = tokenizer(encoded, add_special_tokens=True).input_ids
                if len(full) > length and _starts(full, _word_ids(tokenizer, convert(concept.token))):
                    raise ValueError(f"the identifier {concept.token!r} of residual set {concept.name!r} comes after "
                                     f"the text encoder's {length} tokens in prompt {prompt[:60]!r}... "
                                     f"({len(full)} tokens), where it is cut off; put it earlier or shorten the prompt")
                raise ValueError(f"prompt {prompt!r} does not contain the identifier {concept.token!r} of residual "
                                 f"set {concept.name!r}; write it into the prompt (e.g. 'a photo of a "
                                 f"{concept.token} {concept.class_word or '<class>'}') or sample with lag=False")
    return weights


def _owned(tokenizer, ids: list[int], identifiers: list[list[tuple[int, int]]], starts: list[int],
           concepts: Sequence[Residuals], convert: Callable[[str], str], prompt: str) -> list[list[tuple[int, int]]]:
    """Each concept's identifier occurrences (``identifiers[s]``), where an occurrence several concepts share (two
    sets trained with the same 'sks') kept only by the one whose own class word follows it ("a sks dog next to a
    sks ball"): else each set's residual would also apply where the other subject is.

    Raises:
        ValueError: a shared occurrence that no class word, or several sets' class word, follows.
    """
    owned = [list(spans) for spans in identifiers]
    for span in sorted({span for spans in identifiers for span in spans}):
        claimants = [s for s, spans in enumerate(identifiers) if span in spans]
        if len(claimants) < 2:
            continue
        owners = [s for s in claimants if concepts[s].class_word and
                  _own_class_word(tokenizer, ids, [span], starts, convert(concepts[s].class_word))]
        if len(owners) != 1:
            names = ", ".join(repr(concepts[s].name) for s in claimants)
            words = ", ".join(repr(concepts[s].class_word) for s in claimants)
            raise ValueError(f"residual sets {names} share the identifier {concepts[claimants[0]].token!r}, and in "
                             f"prompt {prompt!r} {'several' if owners else 'none'} of their class words ({words}) "
                             "follow it, so LAG cannot tell whose subject it names: write each identifier with its "
                             "own set's class word right after it (e.g. 'a sks dog next to a sks teapot'), or sample "
                             "with sets trained with different identifiers")
        for s in claimants:
            if s not in owners:
                owned[s].remove(span)
    return owned


def second_prompt_weights(pipe, prompts_2: str | Sequence[str], n_prompts: int, concepts: Sequence[Residuals],
                          include_class: bool = True) -> torch.Tensor:
    """Token weights (P, T, S) of the concepts' words in SDXL's second prompt(s), read with ``tokenizer_2``.

    SDXL joins its two text encoders' outputs position by position (along the features), so a key at position i
    carries the i-th token of the prompt and the i-th token of ``prompt_2``; where the concept sits in the second
    prompt is a place to look as well. A second prompt without the identifier adds nothing.
    """
    tokenizer_2 = getattr(pipe, "tokenizer_2", None)
    if tokenizer_2 is None:
        raise ValueError("prompt_2 is SDXL's second prompt; this pipeline has no tokenizer_2 to read it with")
    prompts_2 = [prompts_2] * n_prompts if isinstance(prompts_2, str) else list(prompts_2)
    if len(prompts_2) != n_prompts:
        raise ValueError(f"prompt_2 has {len(prompts_2)} prompts for {n_prompts} prompts; give one per prompt")
    return concept_weights(tokenizer_2, prompts_2, concepts, include_class, encoded_text(pipe, tokenizer_2),
                           require=False)


def encoded_text(pipe_or_unet, tokenizer) -> Callable[[str], str]:
    """The rewrite a pipeline applies to a text before tokenizing it (identity where it applies none).

    A pipeline with textual inversion (diffusers' ``TextualInversionLoaderMixin``) expands a multi-vector token
    ``<t>`` to ``<t> <t>_1 ...`` in ``encode_prompt``; token positions counted on the raw prompt would be shifted.
    """
    convert = getattr(pipe_or_unet, "maybe_convert_prompt", None)
    if convert is None:
        return lambda text: text
    return lambda text: convert(text, tokenizer)

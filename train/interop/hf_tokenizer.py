"""A Hugging Face model's tokenizer and chat template in plutao's terms, and back.

Import: tokenizer.json becomes an `hf` tokenizer (tokenizer/hf.py) whose specials are the file's
added special tokens; the roles come from tokenizer_config.json (eos, bos, pad, unk; eot is the eos
token). The chat template (chat_template.jinja, or "chat_template" in tokenizer_config.json) is
rendered on probe conversations: where every role opens with one special token and every message
closes with one (as in Phi-3's <|user|> ... <|end|>), those tokens play our system/user/assistant/end
roles, laid out as plutao's template lays them out (tokenizer/chat.py). A template that writes roles as
text (ChatML's "<|im_start|>user\\n") has no such tokens: the run keeps plain-text prompting.

Export: the files that load with `AutoTokenizer.from_pretrained`: an hf tokenizer's own (with the
tokens a run added), or a tokenizer.json built for byte, char and sentencepiece-BPE tokenizers; and
a chat template that renders plutao's layout, so `apply_chat_template` gives our ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from plutao.tokenizer import Tokenizer
from plutao.tokenizer.hf import HFTokenizer
from plutao.tokenizer.specials import SpecialTokens
from plutao.train.config.errors import UserError

CHAT_ROLES = ("system", "user", "assistant")
MARKS = {"system": "PLUTAOSYSTEMMARK", "user": "PLUTAOUSERMARK", "assistant": "PLUTAOASSISTANTMARK"}


def _token(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_json(path: Path) -> dict:
    """A JSON object file of a checkpoint directory, or a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); it must be JSON as transformers writes it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def chat_template(directory: Path, tok_config: dict) -> str | None:
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # (named templates: the default one)
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _render(template: str, messages: list[dict], generation: bool, specials: dict[str, str]) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation, **specials)


def _only_specials(piece: str, names: list[str]) -> list[str] | None:
    """The special tokens `piece` consists of (whitespace between them allowed), or None if it holds text."""
    out, rest = [], piece
    while rest.strip():
        rest = rest.lstrip()
        hit = next((n for n in names if rest.startswith(n)), None)
        if hit is None:
            return None
        out.append(hit)
        rest = rest[len(hit):]
    return out


def template_roles(template: str, specials: list[str], skip: set[str], render_specials: dict[str, str]
                   ) -> tuple[dict[str, str], str]:
    """({role: token} for system/user/assistant/end, one line on what was found) from a chat template."""
    names = sorted(specials, key=len, reverse=True)

    def pieces(messages):
        text = _render(template, messages, False, render_specials)
        parts = re.split("|".join(MARKS[m["role"]] for m in messages), text)
        return [_only_specials(p, names) for p in parts]

    try:
        ua = pieces([{"role": "user", "content": MARKS["user"]}, {"role": "assistant", "content": MARKS["assistant"]}])
    except Exception as e:  # noqa: BLE001 (a template may raise anything on a probe)
        return {}, f"its chat template cannot be rendered ({type(e).__name__}: {str(e)[:80]}); the run keeps plain-text prompting"
    if len(ua) != 3 or any(p is None for p in ua):
        return {}, ("its chat template writes roles as text, not as one special token each; the run keeps plain-text "
                    "prompting (`plutao sft` needs one-token roles)")
    head, between, tail = ([t for t in p if t not in skip] for p in ua)
    if len(head) != 1 or len(between) != 2 or tail != between[:1]:
        return {}, ("its chat template does not open each message with one role token and close it with one end "
                    "token; the run keeps plain-text prompting")
    roles = {"user": head[0], "end": between[0], "assistant": between[1]}
    try:
        su = pieces([{"role": "system", "content": MARKS["system"]}, {"role": "user", "content": MARKS["user"]}])
    except Exception:  # noqa: BLE001 (no system role: a system message is refused at use)
        su = []
    sys_head = [t for t in (su[0] if su else None) or [] if t not in skip]
    if len(su) == 3 and len(sys_head) == 1 and su[1] == [roles["end"], roles["user"]]:
        roles["system"] = sys_head[0]
    shown = ", ".join(f"{r} {t}" for r, t in roles.items())
    return roles, f"its chat template's role tokens ({shown}) play plutao's chat roles, in plutao's layout"


def import_tokenizer(directory: Path, config: dict) -> tuple[HFTokenizer, str]:
    """The hf tokenizer of a checkpoint directory, and one line on its chat template."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory} has no tokenizer.json (the `tokenizers` file a fast tokenizer saves); save the "
                        "tokenizer there with transformers' save_pretrained")
    definition = path.read_text(encoding="utf-8")
    tok_config = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    try:
        data = json.loads(definition)
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); it is not a `tokenizers` file") from None
    probe = HFTokenizer(definition, {})  # (ids of role tokens that are not in added_tokens)

    def role_token(key: str, id_key: str) -> str | None:
        name = _token(tok_config.get(key))
        if name is None and isinstance(config.get(id_key), int) and config[id_key] < probe.vocab_size:
            name = probe._tok.id_to_token(config[id_key])
        return name

    roles = {r: role_token(f"{r}_token", f"{r}_token_id") for r in ("eos", "bos", "pad", "unk")}
    roles = {r: n for r, n in roles.items() if n is not None and probe._tok.token_to_id(n) is not None}
    if "eos" not in roles and "bos" not in roles:
        raise UserError(f"{directory}: neither tokenizer_config.json nor config.json names an eos or bos token; plutao "
                        "needs one to end documents")
    roles["eot"] = roles.get("eos", roles.get("bos"))
    roles.setdefault("eos", roles["eot"])
    roles.setdefault("pad", roles["eot"])  # (padding is never a target: the loss weights say so)
    ids = dict(added)
    for name in roles.values():
        ids.setdefault(name, probe._tok.token_to_id(name))
    template = chat_template(directory, tok_config)
    if template is None:
        note = "it has no chat template; the run keeps plain-text prompting"
    else:
        render_specials = {f"{r}_token": n for r, n in roles.items() if r in ("eos", "bos", "pad", "unk")}
        chat, note = template_roles(template, list(ids), {roles.get("bos"), roles["eot"]}, render_specials)
        roles |= chat
    extra = {name: (directory / name).read_bytes() for name in ("tokenizer_config.json", "special_tokens_map.json",
                                                                "chat_template.jinja") if (directory / name).is_file()}
    return HFTokenizer(definition, SpecialTokens(ids, roles), extra), note


# ---- export -------------------------------------------------------------------------------------


def has_chat_roles(tok: Tokenizer) -> bool:
    """Whether the tokenizer has the tokens plutao's chat template needs (system is optional)."""
    return all(tok.has_special(r) for r in ("user", "assistant", "end"))


def plutao_template(tok: Tokenizer) -> str | None:
    """A Jinja chat template that renders tokenizer/chat.py's layout with this tokenizer's tokens (None
    when it has no chat roles)."""
    if not has_chat_roles(tok):
        return None
    name = {r: tok.special_tokens.roles[r] for r in ("eot", "user", "assistant", "end")}
    system = tok.special_tokens.roles.get("system", "")
    return ("{{ '" + name["eot"] + "' }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ '" + system + "' }}"
            "{% elif message['role'] == 'user' %}{{ '" + name["user"] + "' }}"
            "{% else %}{{ '" + name["assistant"] + "' }}{% endif %}"
            "{{ message['content'] }}{{ '" + name["end"] + "' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + name["assistant"] + "' }}{% endif %}")


def _byte_bpe(tok):
    """A byte tokenizer: ByteLevel's 256 symbols at its byte ids, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: int(tok.ordinary_ids[b]) for b, c in enumerate(_bytes_to_unicode())} | tok.specials
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def _char_bpe(tok):
    """A char tokenizer: its characters at their ids, no merges, unknown characters as its unk."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok.decode([int(i)]): int(i) for i in tok.ordinary_ids} | tok.specials
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=tok.special_tokens.roles.get("unk")))
    hf.decoder = decoders.Fuse()
    return hf


def _built_definition(tok: Tokenizer) -> str:
    """tokenizer.json for a tokenizer kind in BUILDERS."""
    from tokenizers import AddedToken, processors

    hf = BUILDERS[tok.kind](tok)
    # The specials sit in the vocabulary at their ids; declared special, they are matched before the model.
    for name, i in sorted(tok.specials.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if hf.token_to_id(name) != i:
            raise UserError(f"special token {name} would move from id {i} to {hf.token_to_id(name)} in a Hugging Face "
                            "tokenizer; this tokenizer cannot be exported")
    # A text is a document, which plutao's training opened with <|endoftext|> (as `plutao sample` prompts
    # do): tokenizing with special tokens (transformers' default) puts it first, as a Llama tokenizer puts BOS.
    eot = tok.special_tokens.roles["eot"]
    hf.post_processor = processors.TemplateProcessing(single=f"{eot} $A", pair=f"{eot} $A $B",
                                                      special_tokens=[(eot, tok.eot_id)])
    return hf.to_str()


def _sentencepiece_bpe(tok):
    """A `tokenizers` BPE that encodes as the sentencepiece model does: spaces become ▁, words split
    where sentencepiece splits them (a run of ▁ and what follows it), pieces merged in the order of
    their scores, unknown characters as UTF-8 byte pieces, the newline an atomic piece."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HF

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == kinds.NORMAL}
    merges = []
    for piece, score in scores.items():  # (every split of a piece into two pieces: a merge ranked by its score)
        merges += sorted(((piece[:k], piece[k:], score) for k in range(1, len(piece))
                          if piece[:k] in vocab and piece[k:] in vocab), key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: -m[2])
    hf = HF(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], byte_fallback=True, fuse_unk=True,
                       unk_token=proto.pieces[proto.trainer_spec.unk_id].piece))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581+[^\u2581]*|[^\u2581]+"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    symbols = [p.piece for p in proto.pieces if p.type == kinds.USER_DEFINED]  # (the newline)
    hf.add_tokens([AddedToken(s, normalized=False) for s in symbols])
    return hf


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table (the one ByteLevel uses), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


# The kinds whose tokenizer.json is built here (an hf tokenizer carries its own).
BUILDERS = {"byte": _byte_bpe, "char": _char_bpe, "bpe": _sentencepiece_bpe}


def export_tokenizer(tok: Tokenizer, out: Path) -> tuple[dict, str | None]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out`: the special ids
    for config.json (bos/eos/pad_token_id), and a line when the tokenizer could not be written."""
    roles = tok.special_tokens.roles
    ids = {f"{r}_token_id": tok.special_id(roles[r]) if r in roles else None for r in ("bos", "eos", "pad")}
    if ids["eos_token_id"] is None and "eot" in roles:
        ids["eos_token_id"] = tok.eot_id
    if "end" in roles and tok.end_id != ids["eos_token_id"]:  # (a chat reply ends at <|end|>: generation stops there)
        ids["eos_token_id"] = [ids["eos_token_id"], tok.end_id]
    if not isinstance(tok, HFTokenizer) and tok.kind not in BUILDERS:
        return ids, (f"the {tok.kind} tokenizer has no Hugging Face form yet, so the directory has the model without "
                     f"it (ids: the run's tokenizer/); {', '.join(BUILDERS)} and imported tokenizers are exported")
    if isinstance(tok, HFTokenizer):
        definition = tok.definition
        tok_config = json.loads(tok.extra_files["tokenizer_config.json"]) if "tokenizer_config.json" in tok.extra_files else {}
    else:
        definition, tok_config = _built_definition(tok), {}
    (out / "tokenizer.json").write_text(definition, encoding="utf-8")
    tok_config = {k: v for k, v in tok_config.items() if k not in ("chat_template", "added_tokens_decoder",
                                                                   "tokenizer_file", "auto_map")}
    tok_config |= {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   "model_max_length": tok_config.get("model_max_length", 1 << 30)}
    for role in ("eos", "bos", "pad", "unk"):
        if role in roles or (role == "eos" and "eot" in roles):
            tok_config[f"{role}_token"] = roles.get(role, roles.get("eot"))
    tok_config.setdefault("add_bos_token", False)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1), encoding="utf-8")
    template = plutao_template(tok)
    if template is not None:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif isinstance(tok, HFTokenizer) and "chat_template.jinja" in tok.extra_files:
        (out / "chat_template.jinja").write_bytes(tok.extra_files["chat_template.jinja"])
    return ids, None

"""The refusal verifier: rejects refusals, evasions, empty and truncated answers.

A refusal is worth escalating: a bigger model often answers what a small one declined, and a
cached refusal would be served forever. Phrase lists alone misfire ("I can't believe how simple
this is: 42"), so the verifier also asks *where* the phrase is and *what follows*:

* phrases are searched only in the opening (the first two sentences): a refusal is how an answer
  starts, while "I can't guarantee this works on Windows" near the end is a caveat;
* quoted text is ignored ('the bot said "I can't help with that"');
* verbs are listed, so "I cannot stress enough" and "I can't help but notice" do not match;
* when substantive content surrounds the phrase ("I don't have live data, but as of 2023 the
  population was 14 million"), the answer passes. Content is counted in words, after dropping
  sentences that only apologise, redirect ("feel free to ask…", "consult a professional") or
  moralise ("…is illegal and dangerous"), which is what the rest of a refusal usually says.

Languages: English, French, German, Spanish, Italian, Portuguese, Chinese, Japanese, Russian.
Measured on ``fixtures/refusal/labelled.jsonl`` by ``tests/test_verifiers_refusal.py``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from cascade.verify import ConfigError, Verdict, VerifyContext

__all__ = ["Classification", "RefusalVerifier", "classify"]

_EN_NEG = (
    r"(?:can't|cannot|can not|won't|will not|'m unable to|am unable to|'m not able to|"
    r"am not able to|'m not in a position to|am not in a position to|must decline to|"
    r"have to decline to|'m not allowed to|am not allowed to|'m not permitted to|"
    r"am not permitted to|(?:'m|am) afraid i (?:can't|cannot))"
)
_EN_VERB = (
    r"(?:help(?!\s+(?:but|thinking|feeling|wondering|noticing))(?:s|ed|ing)?|"
    r"(?:assist|answer|respond|fulfil|fulfill|support|discuss|offer|process|tell|reveal|"
    r"recommend|access|predict|perform|check|search|view|open|look up|comply|verify|do|"
    r"guess)(?:s|es|ed|ing)?|"
    r"(?:provid|shar|giv|generat|creat|writ|produc|engag|continu|complet|disclos|brows|mak|"
    r"participat|facilitat|endors|condon|advis|diagnos|prescrib|retriev)(?:e|es|ed|ing))\b"
)

_PATTERNS: dict[str, tuple[str, ...]] = {
    "en": (
        rf"\bi\s?{_EN_NEG}\s+(?:\w+\s+){{0,3}}?{_EN_VERB}",
        r"\bi(?:'m| am)(?: really| very)? (?:unable|not able) to\b",
        r"\bi (?:must|have to|will have to|'ll have to) (?:respectfully |politely )?decline\b",
        r"\bas an ai\b",
        r"\bi(?:'m| am) (?:just |only |merely )?an? "
        r"(?:ai|language model|artificial intelligence)\b",
        r"\bi (?:don't|do not) have (?:access|the ability|the capability|the means|any way|"
        r"real-time|realtime|live|browsing|internet|personal|feelings|opinions|"
        r"(?:enough |any )?information (?:about|on))",
        r"\b(?:against|violates?|violating) (?:my|the|our|openai's) (?:\w+ )?(?:guidelines|"
        r"polic(?:y|ies)|programming|principles|rules|terms)",
        r"\bit(?:'s| is|'d be| would be) (?:not appropriate|inappropriate) for me to\b",
        r"\bit(?:'s not| is not|'d not be| would not be| wouldn't be| isn't) (?:appropriate|"
        r"right|ethical) for me to\b",
        r"\bi(?:'m| am) not comfortable\b",
        r"\bnot something i(?: can|'m able to| am able to| will) (?:\w+ )?"
        r"(?:help|assist|do|provide)",
        r"\bi(?:'d| would) rather not\b",
        # bare refusals: the sentence ends at the negation ("Sorry, I can't.")
        r"\bi\s?(?:can't|cannot|can not|won't|will not)(?: do that| do this)?[.!]*$",
        r"\bi (?:refuse|decline) to (?:answer|help|assist|respond|provide|do|discuss|engage|"
        r"comply|share|give|write|create)\b",
        r"\bi must refuse\b",
        rf"\bi(?:'m| am) not going to (?:\w+ ){{0,2}}?{_EN_VERB}",
    ),
    "fr": (
        r"\bje ne (?:peux|pourrai|pourrais|saurais|vais) pas (?:\w+ ){0,2}?(?:vous |t'|te |l')?"
        r"(?:aider|répondre|fournir|faire|donner|accéder|assister|communiquer|partager|"
        r"générer|créer|écrire|traiter|satisfaire|divulguer|prédire|naviguer)",
        r"\bje ne suis pas (?:en mesure|autorisée?|capable|habilitée?) de?\b",
        r"\bil m'est impossible de\b",
        r"\ben tant qu'(?:ia|intelligence artificielle|assistant|modèle de langage)",
        r"\bje n'ai pas (?:accès|la possibilité|la capacité|d'opinions?|de sentiments|"
        r"d'opinion personnelle)",
        r"\bje (?:dois|me dois de) (?:décliner|refuser)",
    ),
    "de": (
        r"\b(?:ich kann|kann ich)(?: ihnen| dir| euch)?(?: \w+){0,2}? nicht(?: \w+)?? "
        r"(?:helfen|weiterhelfen|beantworten|bereitstellen|geben|erstellen|liefern|zugreifen|"
        r"unterstützen|nachkommen|erfüllen|tun|machen|sagen|schreiben|anbieten|vorhersagen)",
        r"\b(?:ich kann|kann ich)(?: ihnen| dir| euch)? keine (?:\w+ ){0,2}?(?:geben|"
        r"bereitstellen|liefern|erstellen|anbieten|auskunft|informationen|ratschläge|hilfe|"
        r"unterstützung|antwort)",
        r"\bals (?:eine? )?(?:ki|künstliche intelligenz|sprachmodell|ki-sprachmodell|"
        r"ki-assistent)\b",
        r"\bich habe keinen (?:zugriff|zugang)\b",
        r"\bich bin nicht in der lage\b",
        r"\bich darf (?:ihnen |dir )?(?:keine|nicht)\b",
        r"\bes ist mir nicht möglich\b",
        r"\bich muss (?:das |diese anfrage |dies )?(?:leider )?ablehnen",
        r"\bich habe keine (?:persönliche meinung|eigene meinung|gefühle|möglichkeit)",
    ),
    "es": (
        r"\bno (?:puedo|podré|podría|me es posible|estoy en condiciones de|estoy autorizad[oa] "
        r"para|soy capaz de) (?:\w+ ){0,2}?(?:ayudar\w*|proporcionar\w*|responder\w*|hacer\w*|"
        r"cumplir|ofrecer\w*|dar\w*|brindar\w*|acceder|generar|crear|escribir|compartir|"
        r"facilitar\w*|asistir\w*|realizar|predecir|navegar|revelar\w*)",
        r"\bcomo (?:un |una )?(?:modelo de lenguaje|ia|inteligencia artificial|asistente de ia)\b",
        r"\bno tengo (?:acceso|la capacidad|opiniones|sentimientos|opinión personal)\b",
        r"\bdebo (?:declinar|rechazar)\b",
    ),
    "it": (
        r"\bnon (?:posso|sono in grado di|mi è possibile|sono autorizzat[oa] a|riesco a|potrò) "
        r"(?:\w+ ){0,2}?(?:aiutar\w*|fornir\w*|risponder\w*|fare|soddisfare|dar\w*|accedere|"
        r"generare|creare|scrivere|condividere|assister\w*|offrir\w*|prevedere|navigare|rivelare)",
        r"\bcome (?:un |una )?(?:modello linguistico|modello di linguaggio|ia|"
        r"intelligenza artificiale|assistente ia)\b",
        r"\bnon ho (?:accesso|la possibilità|la capacità|opinioni|sentimenti)\b",
        r"\bdevo (?:declinare|rifiutare)\b",
    ),
    "pt": (
        r"\bnão (?:posso|consigo|sou capaz de|estou autorizad[oa] a|tenho como|me é possível|"
        r"poderei) (?:\w+ ){0,2}?(?:ajud\w*|te ajudar|fornecer|responder|fazer|cumprir|atender|"
        r"dar|acessar|gerar|criar|escrever|compartilhar|oferecer|auxiliar|prever|navegar|revelar)",
        r"\bcomo (?:um |uma )?(?:modelo de linguagem|ia|inteligência artificial|"
        r"assistente de ia)\b",
        r"\bnão tenho (?:acesso|a capacidade|opiniões|sentimentos|opinião pessoal)\b",
        r"\bdevo (?:recusar|declinar)\b",
    ),
    "zh": (
        r"(?:我|本人)(?:不能|无法|不可以|没办法|没有办法|不便|不会|恐怕不能|恐怕无法)"
        r"(?:为你|为您|帮你|帮您|向你|向您|给你|给您|替你|替您)?"
        r"(?:提供|回答|帮助|协助|帮忙|满足|完成|处理|生成|创作|编写|参与|透露|分享|回复|做|访问|预测)",
        r"作为(?:一个|一名)?(?:ai|人工智能|ai语言模型|语言模型|人工智能助手|ai助手|大语言模型)",
        r"我(?:没有|无法)(?:访问|获取|联网|浏览|实时|个人观点|个人意见)",
        r"(?:抱歉|对不起|很遗憾)[，,]?\s*我(?:不能|无法|没办法)",
    ),
    "ja": (
        r"(?:お手伝い|お答え|回答|提供|対応|サポート|支援|作成|共有|お伝え|アクセス)"
        r"(?:することは|は|を)?(?:できません|できかねます|いたしかねます|致しかねます)",
        r"(?:お答え|回答|対応|提供)(?:し|いたし|致し)かねます",
        r"(?:ai|人工知能|aiアシスタント|ai言語モデル|言語モデル)(?:である私|として、|としては)",
        r"申し訳(?:ありません|ございません)が.{0,40}?(?:できません|できかねます|いたしかねます)",
    ),
    "ru": (
        r"\bя не (?:могу|смогу|в состоянии|имею права|буду) (?:\w+ ){0,2}?(?:помочь|помогать|"
        r"предоставить|предоставлять|ответить|отвечать|выполнить|дать|сделать|создать|"
        r"написать|поделиться|обсуждать|раскрыть|получить|сгенерировать|генерировать|"
        r"поддерживать|предсказать|просматривать)",
        r"\bкак (?:языковая модель|ии|искусственный интеллект|ai|ии-ассистент)\b",
        r"\bу меня нет (?:доступа|возможности|личного мнения|мнения|чувств)",
        r"\b(?:извините|простите|к сожалению),? (?:но )?я не (?:могу|смогу)\b",
    ),
}

_REDIRECT = re.compile("|".join((
    # English
    r"\bi(?: can| could| would be happy to|'d be happy to|'m happy to| am happy to|"
    r"'d be glad to| would be glad to| suggest| recommend| encourage| hope| understand|"
    r" apologi[sz]e)\b",
    r"\b(?:feel free|let me know|please (?:consult|contact|seek|reach out|ask|check|visit|"
    r"refer|try)|you (?:may|might|could|can|should) (?:want to |wish to )?(?:consult|contact|"
    r"try|ask|check|visit|seek|reach out|look|refer|speak|talk|use)|if you (?:have|need|want|"
    r"are|'re)|if you're|instead|other (?:questions|topics)|something else|anything else|"
    r"is there anything|professional|doctor|lawyer|attorney|physician|therapist|"
    r"illegal|unethical|harmful|dangerous|inappropriate|against the law|"
    r"guidelines|policies|training data|knowledge cutoff|my capabilities)\b",
    # other languages: offers, redirects, warnings
    r"n'hésitez pas|je peux (?:vous )?(?:aider|proposer)|si vous avez|autre question|"
    r"professionnel|consulter|illégal|dangereux",
    r"\bgerne\b|\bwenn sie\b|andere frage|fachmann|fachperson|\barzt\b|anwalt|illegal|gefährlich|"
    r"kann ich ihnen|wenden sie sich",
    r"no dudes|puedo ayudarte|si tienes|otra pregunta|profesional|consultar|ilegal|peligros",
    r"non esitare|posso aiutarti|se hai|altra domanda|professionista|consultare|illegale|"
    r"pericolos",
    r"fique à vontade|posso ajudar|se você tiver|outra pergunta|profissional|consultar|"
    r"perigos",
    r"如果您?有|其他问题|可以帮|建议您?|专业|违法|非法|危险|请咨询|请理解",
    r"他に|ほかに|お手伝いできること|専門家|違法|危険|ご了承|ご理解",
    r"если у вас|други[ех] вопрос|могу помочь|специалист|незаконн|опасн|обратитесь",
)))

_CONTRAST = re.compile(
    r"[;:—–]|(?:,\s*|\s)(?:but|however|though|although|yet|mais|cependant|toutefois|aber|"
    r"jedoch|allerdings|pero|sin embargo|ma|tuttavia|però|mas|porém|contudo|но|однако)\b"
    r"|但是?|不过|可是|しかし|ですが|けれど"
)

_COURTESY = frozenset({
    "i", "i'm", "im", "am", "sorry", "apologies", "apologize", "apologise", "unfortunately",
    "regrettably", "sadly", "thank", "thanks", "you", "for", "your", "question", "request",
    "asking", "ask", "great", "good", "sure", "well", "hmm", "ok", "okay", "hi", "hello",
    "but", "however", "afraid", "really", "very", "so", "that", "this", "hey", "dear", "oh",
    "ah", "désolé", "désolée", "malheureusement", "merci", "leider", "tut", "mir", "es",
    "leid", "entschuldigung", "lo", "siento", "desafortunadamente", "lamentablemente",
    "gracias", "mi", "dispiace", "purtroppo", "grazie", "desculpe", "infelizmente", "obrigado",
    "obrigada", "извините", "простите", "к", "сожалению", "спасибо",
})
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
_QUOTED = re.compile(r"\"[^\"\n]{1,400}\"|“[^”]{1,400}”|«[^»]{1,400}»|„[^“”]{1,400}[“”]|"
                     r"「[^」]{1,400}」|『[^』]{1,400}』|^\s*>.*$", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_COMPILED = {lang: tuple(re.compile(p) for p in ps) for lang, ps in _PATTERNS.items()}


def _normalise(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).casefold()
    t = t.replace("’", "'").replace("‘", "'").replace("`", "'")
    t = re.sub(r"[*_#]+", "", t)  # markdown emphasis and headings
    return t


def _words(text: str, *, drop_courtesy: bool = False) -> int:
    cjk = len(_CJK.findall(text))
    tokens = re.findall(r"[\w']+", _CJK.sub(" ", text))
    if drop_courtesy:
        tokens = [w for w in tokens if w not in _COURTESY]
    return len(tokens) + cjk // 2


def _find(sentence: str) -> tuple[re.Match[str], str] | None:
    best: tuple[re.Match[str], str] | None = None
    for lang, patterns in _COMPILED.items():
        for p in patterns:
            m = p.search(sentence)
            if m and (best is None or m.start() < best[0].start()):
                best = (m, lang)
    return best


@dataclass(frozen=True)
class Classification:
    """Why a text is, or is not, a refusal."""

    refusal: bool
    reason: str


def classify(text: str, finish_reason: str | None = None, *, min_chars: int = 1,
             head_sentences: int = 2, min_substance: int = 6, min_lead: int = 3,
             extra: tuple[re.Pattern[str], ...] = ()) -> Classification:
    """Decide whether ``text`` refuses or evades rather than answers (see the module doc)."""
    if finish_reason == "length":
        return Classification(True, "truncated: the model hit max_tokens (finish_reason=length)")
    if finish_reason == "content_filter":
        return Classification(True, "blocked by the provider's content filter")
    visible = "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip()
    if not visible:  # also with min_chars = 0; zero-width spaces and BOMs are not an answer
        return Classification(True, "empty answer")
    if len(visible) < min_chars:
        return Classification(True, f"answer shorter than {min_chars} characters")
    norm = _normalise(text)
    for p in extra:  # user patterns are trusted as they are: anywhere in the text
        m = p.search(norm)
        if m:
            return Classification(True, f"matches configured pattern {p.pattern!r}")
    sentences = [s.strip() for s in _SENTENCE_END.split(_QUOTED.sub(" ", norm)) if s.strip()]
    for i, sentence in enumerate(sentences[:head_sentences]):
        found = _find(sentence)
        if found is None:
            continue
        m, lang = found
        # What precedes the phrase counts as content only in earlier sentences or before a
        # clause break: in SOV languages the object of the refusal comes before its verb.
        clause = max(sentence.rfind(ch, 0, m.start()) for ch in ";:—")
        before = " ".join(sentences[:i]) + " " + (sentence[:clause] if clause > 0 else "")
        after_parts: list[str] = []
        contrast = _CONTRAST.search(sentence, m.end())
        if contrast:
            after_parts.append(sentence[contrast.end():])
        after_parts.extend(sentences[i + 1:])
        lead = 0 if _REDIRECT.search(before) else _words(before, drop_courtesy=True)
        substance = lead
        for part in after_parts:
            if _find(part) is None and not _REDIRECT.search(part):
                substance += _words(part)
        phrase = sentence[m.start(): m.end()]
        if lead >= min_lead or substance >= min_substance:
            return Classification(False, f"refusal-like phrase {phrase!r} ({lang}) but "
                                  f"{substance} words of content around it")
        return Classification(True, f"refusal: {phrase!r} ({lang})")
    return Classification(False, "no refusal or evasion found")


class RefusalVerifier:
    """Fails refusals and evasions in nine languages, and empty or truncated answers."""

    expensive = False
    inline = True
    """Runs on the event loop: a bounded check of a reply already capped in size."""

    def __init__(self, extra_patterns: list[str] | tuple[str, ...] = (), min_chars: int = 1,
                 *, head_sentences: int = 2, min_substance: int = 6,
                 name: str = "refusal") -> None:
        compiled: list[re.Pattern[str]] = []
        for i, p in enumerate(extra_patterns):
            try:
                compiled.append(re.compile(p, re.IGNORECASE))
            except re.error as e:
                raise ConfigError(f"is not a valid regular expression: {e}",
                                  source=f"verifier {name!r}", key=f"extra_patterns[{i}]"
                                  ) from None
        self.name = name
        self.extra = tuple(compiled)
        self.min_chars = min_chars
        self.head_sentences = head_sentences
        self.min_substance = min_substance

    def verify(self, ctx: VerifyContext) -> Verdict:
        c = classify(ctx.candidate.text, ctx.candidate.completion.finish_reason,
                     min_chars=self.min_chars, head_sentences=self.head_sentences,
                     min_substance=self.min_substance, extra=self.extra)
        return Verdict(passed=not c.refusal, reason=c.reason)

"""A few hundred prompts for tokenizer parity: what users actually type, and what breaks tokenizers."""

from __future__ import annotations

import random

HAND_WRITTEN = [
    "",
    " ",
    "a photo of a cat",
    "a photograph of an astronaut riding a horse",
    "A MAJESTIC LION, Golden Hour, 8K, HDR",
    "cinematic still of a cyberpunk city at night, neon lights, rain, reflections, highly detailed",
    "(masterpiece:1.2), (best quality), ((ultra detailed)), [blurry], {cute} cat",
    "portrait of a woman, (freckles:0.8), (red hair:1.3), soft light, bokeh, 85mm",
    "landscape | mountains | lake -- v 5 --ar 16:9",
    "Café au lait on a marble table, naïve art, façade, résumé, jalapeño, crème brûlée",
    "Ærøskøbing harbour, Smørrebrød, ÅÄÖ åäö, Łódź, Kraków, Dvořák, Čeština",
    "İstanbul skyline at dusk, ıi İI, straße, STRASSE, ß, ﬁ ligature, ﬂower",
    "ΣΊΣΥΦΟΣ ΟΔΟΣ Athens, Ελληνικά γράμματα, ΟΔΥΣΣΕΥΣ",
    "Москва, Красная площадь зимой, снег",
    "東京の夜景, 桜の花, 富士山",
    "你好世界，一只可爱的猫咪在草地上",
    "서울의 밤 풍경, 한옥 마을",
    "مدينة عربية قديمة في الصحراء",
    "עיר עתיקה בירושלים",
    "हिमालय के पहाड़, सूर्योदय",
    "ภาพวาดวัดในกรุงเทพ",
    "🚀 rocket launch 🔥🔥🔥 with 🌕 moon",
    "👩‍🚀 astronaut emoji with ZWJ, 🏳️‍🌈 flag, 👍🏽 thumbs",
    "😀😃😄😁😆😅😂🤣🥲☺️😊😇🙂🙃😉😌😍🥰😘",
    "!!!",
    "???!!!...;;;:::",
    "hello!!! world??? ... --- *** ### @@@ $$$ %%% ^^^ &&&",
    "a!b!c! d!e!f! !start end!",
    "wow! amazing! incredible!",
    "tabs\tand\tnewlines\nand\r\nwindows line endings",
    "   leading and trailing spaces   ",
    "multiple     spaces      between       words",
    "non\u00a0breaking\u2003em\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\u200cjoiners\u200dhere\ufeffbom",
    "control\x00chars\x01and\x1fdel\x7f",
    "replacement char \ufffd here",
    "MiXeD CaSe PrOmPt WiTh CaPs LoCk",
    "don't can't won't it's we're they've I'm you'll he'd",
    "DON'T CAN'T IT'S WE'RE THEY'VE I'M YOU'LL HE'D",
    "dont's 's 't 're quotes ’curly’ “double” ‘single’ «guillemets» „low“",
    "numbers 1234567890 3.14159 1e10 -42 +7 0x1F 1,000,000",
    "١٢٣ arabic digits, ४५६ devanagari digits, ①②③ circled, ⅷ roman",
    "math: x² + y³ = z⁴, ∑∫∂√∞≠≈≤≥, α β γ δ",
    "symbols © ® ™ § ¶ † ‡ • … ‰ ′ ″ € £ ¥ ¢ ₿",
    "arrows → ← ↑ ↓ ⇒ ⇐ ⟶ and boxes ■□▲△●○",
    "<|startoftext|> special tokens in text <|endoftext|>",
    "<|STARTOFTEXT|> upper-case specials <|EndOfText|>",
    "<|endoftext|><|endoftext|>",
    "html <b>bold</b> &amp; &lt;tag&gt; and urls https://example.com/a?b=c&d=e",
    "email someone@example.com and @handle #hashtag",
    "path/to/file.png C:\\Windows\\System32 ~/home",
    "snake_case camelCase PascalCase kebab-case SCREAMING_SNAKE",
    "trending on artstation, unreal engine 5, octane render, by greg rutkowski",
    "by Hayao Miyazaki and Studio Ghibli, watercolor, pastel colors",
    "a",
    "I",
    ".",
    "!",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "combining: e\u0301 (e + acute) vs é, a\u0308 vs ä, n\u0303 vs ñ",
    "fullwidth ＡＢＣ ａｂｃ １２３ ！？",
    "half-width katakana ｱｲｳｴｵ",
    "(((((((nested))))))) [[[[[brackets]]]]] {{{{{braces}}}}}",
    "weights (cat:1.5) (dog:0.5) [bird:0.3] (tree:1.1)",
    "BREAK keyword BREAK in prompts AND composable AND",
    "negative: lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, cropped, worst quality",
]


def _generated(n: int, seed: int = 1234) -> list[str]:
    """Random mixtures of words, scripts, emoji, punctuation runs, whitespace and weights syntax."""
    rng = random.Random(seed)
    words = ("cat dog astronaut horse castle forest river neon cyberpunk portrait landscape photo painting "
             "golden hour cinematic detailed ultra realistic fantasy dragon knight robot city night rain").split()
    exotic = ["café", "naïve", "Σίσυφος", "東京", "猫", "서울", "Москва", "🚀", "🔥", "👩‍🚀", "ß", "İ", "ﬁ", "é", "ＡＢＣ",
              "١٢٣", "①", "™", "€", "…", "’", "«", "»", "\u200b", "\u00a0", "\t", "\n", "<|endoftext|>", "!"]
    puncts = ["!", "?", ".", ",", ";", ":", "-", "_", "*", "#", "(", ")", "[", "]", "{", "}", "/", "\\", "'", '"']
    out = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(1, 40 if i % 7 else 120)):  # every 7th is long enough to be truncated
            r = rng.random()
            if r < 0.55:
                w = rng.choice(words)
                w = w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
                parts.append(w)
            elif r < 0.75:
                parts.append(rng.choice(exotic))
            elif r < 0.9:
                parts.append(rng.choice(puncts) * rng.randint(1, 5))
            else:
                parts.append(f"({rng.choice(words)}:{rng.uniform(0.1, 2.0):.1f})")
        sep = rng.choice([" ", " ", ", ", "  ", ""])
        out.append(sep.join(parts))
    return out


LONG = [
    ", ".join(["a very long prompt"] * 40),  # > 77 tokens: truncated as diffusers does
    " ".join(f"word{i}" for i in range(200)),
    "x" * 5000,
    "🚀" * 300,
]

PROMPTS = HAND_WRITTEN + LONG + _generated(200)

"""Regenerates the real-model data (deterministic): python data/smollm2/make_data.py

The task (train.jsonl, eval.jsonl, chat format): a "capital card". Asked `Capital card:
<country>`, answer with one line of JSON, `{"country": "<country>", "capital": "<capital>"}`.
SmolLM2-135M-Instruct has never seen the request or the format, so before fine-tuning it
answers with prose (accuracy 0); it knows many capitals from pretraining. Learning the skill
means the format and the request, applied to countries the training rows never named (eval.jsonl
holds other countries than train.jsonl): the facts come from the base, the skill from the rows.

general.txt: real English prose the base model read in pretraining, for forgetting: paragraphs of
Python's own documentation as every CPython ships it (the `pydoc_data.topics` module; Python
Software Foundation License), lines of code left out.

replay.txt: other paragraphs of the same documentation, for replay (bench/spectrum.py --base real):
prose that also names code inline (quoted names, `*emphasis*`, operators), which general.txt's
filter leaves out, so the two files share no paragraph. Paragraphs are separated by blank lines
(one row each when read as `.txt`).
"""

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Nigeria": "Abuja", "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa", "Ghana": "Accra", "South Africa": "Pretoria", "Senegal": "Dakar",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Zimbabwe": "Harare", "Japan": "Tokyo", "China": "Beijing",
    "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Nepal": "Kathmandu", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Jordan": "Amman", "Lebanon": "Beirut", "Syria": "Damascus",
    "Afghanistan": "Kabul", "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "United States": "Washington, D.C.", "Mexico": "Mexico City", "Cuba": "Havana", "Jamaica": "Kingston",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Bolivia": "La Paz", "Uruguay": "Montevideo",
    "Paraguay": "Asuncion", "Mongolia": "Ulaanbaatar", "Kazakhstan": "Astana", "Qatar": "Doha",
    "Kuwait": "Kuwait City", "Singapore": "Singapore", "Sri Lanka": "Colombo", "Myanmar": "Naypyidaw",
    "Cambodia": "Phnom Penh", "Laos": "Vientiane", "Libya": "Tripoli", "Sudan": "Khartoum", "Angola": "Luanda",
    "Zambia": "Lusaka", "Madagascar": "Antananarivo", "Panama": "Panama City", "Costa Rica": "San Jose",
    "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "Guatemala": "Guatemala City", "Estonia": "Tallinn",
    "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Albania": "Tirana", "Belarus": "Minsk", "Georgia": "Tbilisi", "Armenia": "Yerevan", "Cyprus": "Nicosia",
    "Malta": "Valletta", "Luxembourg": "Luxembourg",
}
EVAL_COUNTRIES = 32


def card(country: str) -> dict:
    answer = json.dumps({"country": country, "capital": CAPITALS[country]})
    return {"messages": [{"role": "user", "content": f"Capital card: {country}"},
                         {"role": "assistant", "content": answer}]}


def prose_paragraphs(inline_code: bool = False) -> list[str]:
    """Paragraphs of running English from Python's documentation: no code, no grammar rules.
    `inline_code`: instead, the prose paragraphs that name code inline (general.txt has none)."""
    import pydoc_data.topics

    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for block in pydoc_data.topics.topics[name].split("\n\n"):
            lines = block.splitlines()
            if not lines or any(line.startswith((" ", "*", "=", "-", ">")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) <= 200:
                continue
            plain = re.fullmatch(r"[A-Za-z0-9 ,.;:'()\"-]+", text) is not None
            if plain and not inline_code:
                paragraphs.append(text)
            elif not plain and inline_code and re.fullmatch(r"[A-Za-z0-9 ,.;:'()\"`_\[\]/!?*+=<>{}%&#|~^\\-]+", text):
                paragraphs.append(text)
    return paragraphs


def main() -> None:
    countries = sorted(CAPITALS)
    random.Random(37).shuffle(countries)
    held_out, trained = countries[:EVAL_COUNTRIES], countries[EVAL_COUNTRIES:]
    for name, names in (("train", trained), ("eval", held_out)):
        with (HERE / f"{name}.jsonl").open("w") as f:
            for country in names:
                f.write(json.dumps(card(country)) + "\n")
    paragraphs = prose_paragraphs()
    random.Random(37).shuffle(paragraphs)
    (HERE / "general.txt").write_text("\n\n".join(paragraphs[:120]) + "\n")  # a paragraph a row
    replay = prose_paragraphs(inline_code=True)
    random.Random(37).shuffle(replay)
    (HERE / "replay.txt").write_text("\n\n".join(replay) + "\n")


if __name__ == "__main__":
    main()

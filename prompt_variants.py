"""The prompt-diversity study's wordings: nine more of each environment's prompt (templates 1 to 9).

"Debunk the Myth of SFT Generalization" (arXiv 2510.00237) finds that SFT on many wordings of one task keeps a model
from tying the task to one template. Each wording here states the same facts as the environment's own prompt
(template 0, kept in env_points.py and env_virl.py) in its own words and order, and asks for the same fields. The
environments read this file only when `prompt_template` is 1 or more: without it, they run on template 0 alone.

A GeneralPoints template: (cards in the image, cards listed: {} the ranks as `join` joins them, join, the face
cards under the ID rule, under the OOD rule, the prompt with $cards, $faces and $target).
A V-IRL template: (the prompt, one instruction, one past position, the past when empty, the views' paragraph), the
prompt's fields {steps}, {past}, {n} (the current position), {current}, {choices} (the turn directions) and {view}
(V-IRL-VL's paragraph, else nothing).
"""
import json


def _and_list(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _json_list(ranks) -> str:
    return json.dumps(list(ranks))


POINTS = (
    ("Your hand is the four cards in the image.", "Your hand: {}.", ", ".join,
     "J = Q = K = 10", "J = 11, Q = 12, K = 13",
     "Answer with a single JSON object, with no text around it, of the form\n"
     '{"cards": [...], "number": [...], "formula": "..."}\nPut in "cards" the ranks of your four cards (written A, '
     '2-10, J, Q, K), in "number" the value each card counts for, in the same order, and in "formula" an arithmetic '
     'expression such as "(3+5)*(7-4)".\n$cards\nCard values: A = 1, $faces, and the cards 2 to 10 are worth the '
     "number they show.\nThe expression must use each card's value once and only once, may combine the values with "
     "+ - * / and brackets, and must come to exactly $target."),
    ("Four cards lie on the table, as the image shows.", "Four cards lie on the table: {}.", _json_list,
     "a jack, queen or king (J, Q, K) is 10", "a jack (J) is 11, a queen (Q) 12 and a king (K) 13",
     "$cards\nYour job is to reach $target with them. Each card stands for one number, and you must use every one of "
     "these numbers exactly once, joined by addition, subtraction, multiplication, division and parentheses.\n"
     "What a card stands for: an ace (A) is 1, $faces, and any other card is its printed number.\n"
     'Reply with JSON only, one object holding three keys in this order: "cards" (the four ranks, as A, 2-10, J, Q '
     'or K), "number" (the number of each card, in the same order) and "formula" (your expression, e.g. "4*(5+1)").'),
    ("see the image (four cards)", "{}", " ".join, "J, Q and K are 10", "J is 11, Q is 12, K is 13",
     "Solve a round of the $target points card game.\nCards dealt: $cards\nRules:\n"
     "1. Every card has a value: A is 1, $faces; the cards 2 to 10 have their printed value.\n"
     "2. Write a formula that uses each of the four values exactly once.\n"
     "3. Only +, -, *, / and parentheses may join the values.\n4. The formula must evaluate to $target.\n"
     'Output format (one JSON object, nothing else):\n{"cards": ["<rank>", "<rank>", "<rank>", "<rank>"], "number": '
     '[<value>, <value>, <value>, <value>], "formula": "<formula>"}\n"cards" holds the ranks as dealt (A, 2-10, J, '
     'Q, K), "number" their values in the same order and "formula" the formula, for instance "(8-2)*(1+3)".'),
    ("the four cards in the image", "the cards {}", _and_list,
     "J, Q, K count as 10 each", "J counts as 11, Q as 12, K as 13",
     "Question: given $cards, how can you make $target?\nCounting: the ranks 2 through 10 count as printed, A counts "
     "as 1, and $faces.\nConstraints: use the number of each card exactly once; combine the numbers with +, -, *, / "
     'and parentheses only.\nAnswer as one JSON object with the fields "cards" (the four ranks: A, 2-10, J, Q, K), '
     '"number" (what each card counts as, same order) and "formula" (an expression equal to $target, like '
     '"(6-2)*(3+3)"). Write nothing but the JSON object.'),
    ("in the image", "[{}]", ", ".join, "J=Q=K=10", "J=11, Q=12, K=13",
     "Card values in this game: A=1, 2-10 = the printed number, $faces.\nTarget: $target.\nCards: $cards\n"
     "Task: combine the four card values, each used exactly once, with + - * / and ( ), into a formula equal to the "
     'target.\nOutput: exactly one JSON object {"cards": [...], "number": [...], "formula": "..."}, where "cards" = '
     'the ranks (A, 2-10, J, Q, K), "number" = their values in the same order, "formula" = the formula, e.g. '
     '"2*(3+9)".'),
    ("I deal you four cards; you can see them in the image.", "I deal you four cards: {}.", ", ".join,
     "J, Q and K are each 10", "J is 11, Q is 12 and K is 13",
     "Let's play $target. $cards\nBuild an arithmetic expression that equals $target, using the value of each of "
     "your cards one time, no more and no less. You may add, subtract, multiply and divide, and group with "
     "parentheses.\nRemember how cards are valued: A is 1; $faces; every other card is worth the number on it.\n"
     'When you answer, give only a JSON object whose "cards" field lists the four ranks (A, 2-10, J, Q, K), whose '
     '"number" field lists the value of each card in that same order, and whose "formula" field is your expression, '
     'for example "(5-1)*(4+2)".'),
    ("The cards you hold are pictured in the image.", "The cards you hold: {}", _json_list,
     "J, Q and K count 10", "J counts 11, Q 12, K 13",
     "Respond in JSON, as one object with exactly these keys, in this order:\n"
     '- "cards": a list of the four ranks (A, 2-10, J, Q, K)\n- "number": a list of the four numbers those cards '
     'count for, in the same order\n- "formula": a string holding your formula, e.g. "(7-3)*(2+4)"\n'
     "The formula must combine all four numbers, each exactly once, using +, -, *, / and parentheses, and equal "
     "$target.\nNumbers of the cards: A counts 1, $faces, and a number card counts its printed number.\n$cards"),
    ("Shown in the image.", "{}", " | ".join, "J, Q, K -> 10", "J -> 11, Q -> 12, K -> 13",
     "## Game\n$target points: turn four playing cards into the number $target.\n## Card values\n"
     "A -> 1, 2..10 -> as printed, $faces\n## Your cards\n$cards\n## What to do\n"
     "Use each card's value exactly once with +, -, *, / and parentheses so that the result is $target.\n"
     '## Answer format\nA single JSON object and nothing else: {"cards": [ranks A, 2-10, J, Q, K], "number": '
     '[values, same order], "formula": "your formula, e.g. (9-3)*(1+3)"}'),
    ("the four cards shown in the image", "the cards {}", _and_list, "J, Q and K as 10", "J as 11, Q as 12 and K as 13",
     "Exercise ($target points). You hold $cards; A counts as 1, $faces, any other card as its number.\n"
     "Write down a formula over these four numbers that uses each exactly once, uses only +, -, *, / and "
     'parentheses, and equals $target.\nGive your solution as one JSON object, nothing else: "cards" for the ranks '
     '(A, 2-10, J, Q, K), "number" for the numbers they count as, in the same order, and "formula" for the formula '
     '(e.g. "(2+2)*(3+3)"), as in {"cards": [...], "number": [...], "formula": "..."}.'),
)

VIRL = (
    ('Reply with exactly one JSON object:\n{{"current observation": "...", "current instruction": "...", '
     '"action": "..."}}\n"current observation" describes what you observe where you stand now, "current '
     'instruction" is the route instruction you are carrying out there, and "action" is your next move, taken '
     "from the allowed actions.\n\nAllowed actions:\n- forward(): go ahead to the next position\n- turn_direction(x): "
     "turn to face x, where x is one of {choices}\n- stop(): you have arrived at the destination\n\nYou are walking a "
     "route through a city, one position at a time. The route:\n{steps}\n\n{view}Positions so far:\n{past}Position "
     "{n} (current) - observed: {current}",
     "Step {i}: {s}", "Position {i} - observed: {o}\nPosition {i} - action taken: {a}\n", "",
     "At the current position you see one image of four street views in a 2x2 grid: the front view top left, the "
     "right view top right, the back view bottom left and the left view bottom right. Look in them for the landmarks "
     "the route names.\n\n"),
    ("Navigation task. You walk along a route in a city, position by position, following written directions. At "
     "every position, report what you see, name the direction you are following, and choose the next action.\n\n"
     "What you have seen and done, oldest first:\n{past}Now you see: {current}\n\nRoute directions:\n{steps}\n\n"
     "Actions you may take: forward() moves you to the next position; turn_direction(x) turns you to face x, with x "
     "one of {choices}; stop() ends the walk at the destination.\n\n{view}Output one JSON object only, with the keys "
     '"current observation" (what you see now), "current instruction" (the direction you are following) and '
     '"action" (the action you take).',
     "({i}) {s}", "{i}. saw: {o} | did: {a}\n", "nothing yet, this is the first position\n",
     "What you see is one image of 4 street views, laid out as a 2x2 grid: front and right on the top row, back and "
     "left on the bottom row. Check it for the landmarks the directions mention.\n\n"),
    ("## Role\nYou guide a pedestrian through a city along a described route, deciding one move per position.\n"
     "## Route instructions\n{steps}\n## Moves\n* forward() - walk on to the next position\n* turn_direction(x) - "
     "face x, where x is one of {choices}\n* stop() - the destination is reached\n{view}## Trajectory\n{past}t{n} "
     'observation: {current}   <- now\n## Answer\nA single JSON object, {{"current observation": ..., "current '
     'instruction": ..., "action": ...}}, giving what you observe at t{n}, the instruction you are following '
     "there, and your move.",
     "{i}) {s}", "t{i} observation: {o}\nt{i} action: {a}\n", "",
     "## Views\nA 2x2 image of street views: [front | right] on top, [back | left] below. Watch for the landmarks "
     "named in the instructions.\n"),
    ("Question: you are following the route below and stand at position {n}. What do you observe, which instruction "
     "are you following, and what is your next action?\n\nRoute:\n{steps}\n\nEarlier positions:\n{past}At this "
     "position you observe: {current}\n\n{view}Possible actions are forward() (advance to the next position), "
     "turn_direction(x) (turn to face x, x being one of {choices}) and stop() (you are at the destination).\n\n"
     'Answer format: one JSON object and nothing else, {{"current observation": "<what you observe>", "current '
     'instruction": "<the instruction you follow>", "action": "<your action>"}}.',
     "Instruction {i} - {s}", 'At position {i} you observed "{o}" and took the action {a}.\n',
     "None: you are at the first position.\n",
     "Your observation is an image of four street views in a 2x2 grid (top: front, right; bottom: back, left); find "
     "in it the landmarks the instructions name.\n\n"),
    ("Current observation: {current}\n\nPrevious observations and actions:\n{past}\nYou are a navigator on foot. "
     "These are the numbered instructions of your whole route; carry them out in order:\n{steps}\n\n{view}Action "
     "space: forward() | turn_direction(x), x in {choices} | stop()\nforward() takes you to the next position, "
     "turn_direction(x) turns you to face x, stop() means you have arrived.\n\nRespond with JSON only, one object "
     'with three fields, in this order: "current observation", what you observe now; "current instruction", the '
     'instruction you are carrying out; "action", one action from the action space.',
     "[{i}] {s}", "{i}) {o} => {a}\n", "(none)\n",
     "The current observation is a picture made of four street views, 2 by 2: front (top left), right (top right), "
     "back (bottom left), left (bottom right). Look for the landmarks of the instructions.\n\n"),
    ("INPUT\nroute instructions:\n{steps}\nhistory:\n{past}current observation: {current}\n{view}ACTIONS\nforward() "
     "= move to the next position; turn_direction(x) = turn to face x (x in {choices}); stop() = at the destination\n"
     'OUTPUT\none JSON object: {{"current observation": <what you observe>, "current instruction": <the '
     'instruction being carried out>, "action": <an action from ACTIONS>}}\nTASK\nNavigate the route one position '
     "at a time: read the current observation against the instructions and pick the next action.",
     "  #{i} {s}", "  #{i} observation={o} action={a}\n", "  (empty)\n",
     "VIEWS\none image, a 2x2 grid of street views: front, right (top row); back, left (bottom row)\n"),
    ("Imagine you are on foot in a city, finding your way with these directions, which you follow in order:\n"
     "{steps}\nOn the way you noted:\n{past}Where you stand now (position {n}): {current}\n{view}At each position you "
     "take exactly one action: forward() to walk on to the next position, turn_direction(x) to turn and face x (x is "
     "one of {choices}), or stop() once you reach the destination.\nSay what you observe, which of the directions you "
     'are following, and what you do next, as one JSON object and nothing else: {{"current observation": "...", '
     '"current instruction": "...", "action": "..."}}',
     "{i}. {s}", "- at position {i} you saw: {o} (you chose {a})\n", "- nothing so far\n",
     "What you see comes as one image of four street views in a 2x2 grid, front and right above, back and left "
     "below; spot in it the landmarks of your directions.\n"),
    ('Your answer must be one JSON object with these keys, in this order:\n- "current observation": what you '
     'observe at your position\n- "current instruction": which route instruction you are carrying out\n- '
     '"action": the next action, one of forward(), turn_direction(x) with x among {choices}, or stop()\nforward() '
     "moves you to the next position, turn_direction(x) turns you to face x, and stop() says you have reached the "
     "destination.\n\nThe route you are navigating, step by step:\n{steps}\n\n{view}Log of the walk:\n{past}O_{n} = "
     "{current} (now)",
     "Step {i}. {s}", "O_{i} = {o}\nA_{i} = {a}\n", "",
     "Your observations are images of 4 street views in a 2x2 grid ([front, right] over [back, left]); check them "
     "for the landmarks of the route.\n\n"),
    ("You are a navigation agent in a city. Rules: go one position at a time; at each position, compare what you "
     "observe with the route instructions, then take the action that carries out the current instruction.\n"
     "Actions: forward() (to the next position), turn_direction(x) (face x, with x in {choices}), stop() (the "
     "destination is reached).\nRoute, numbered:\n{steps}\n{view}Log:\n{past}[{n}] {current} -> ?\nAnswer: one JSON "
     'object holding "current observation" (what you observe), "current instruction" (the instruction in '
     'progress) and "action" (your action), nothing else.',
     "{i} - {s}", "[{i}] {o} -> {a}\n", "",
     "Views: each position shows one image, four street views in a 2x2 grid, front top left, right top right, back "
     "bottom left, left bottom right.\n"),
)

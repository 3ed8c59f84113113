"""A fixed list of a few hundred captions for checking encoder precision (fp32 vs int8).

Written for this project: short image captions of the kind the model is prompted with
(objects, colours, emoji names, little scenes), built from a few word lists.
"""

from __future__ import annotations

import itertools

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
_THINGS = ["circle", "square", "triangle", "apple", "car", "cat", "dog", "heart", "star", "house",
           "tree", "flower", "bird", "fish", "ball", "hat", "boat", "moon", "cup", "book"]
_SENTENCES = [
    "a happy dog", "a sad face", "a grinning face with big eyes", "a boy", "a man", "a woman",
    "a girl playing in the park", "an old man with a beard", "a slice of pizza", "a hot cup of coffee",
    "a rocket flying to the moon", "a smiling sun", "a rainy day", "a snowman in winter",
    "a cat sleeping on a sofa", "two birds on a wire", "a bowl of noodles", "fireworks at night",
    "a thumbs up", "a face with tears of joy", "a red apple on a table", "a green leaf",
    "a monkey covering its eyes", "a pile of poo", "a ghost", "a robot face", "a birthday cake",
    "a bunch of grapes", "a strawberry", "a banana", "a watermelon slice", "a broken heart",
    "a sparkling star", "a fire", "a lightning bolt", "a rainbow", "a four leaf clover",
    "an alarm clock", "a magnifying glass", "a key", "a musical note", "a soccer ball",
    "a basketball", "a trophy", "a medal", "a gift box", "a balloon", "a party popper",
    "a winking face", "a face blowing a kiss", "a sleepy face", "an angry face",
    "a face with a thermometer", "a clown face", "an alien", "a skull", "a unicorn",
    "a horse", "a cow", "a pig", "a frog", "a turtle", "a snake", "a dragon", "a whale",
    "a dolphin", "an octopus", "a crab", "a butterfly", "a bee", "a ladybug", "a spider",
    "a cactus", "a palm tree", "a mushroom", "a carrot", "an avocado", "a hamburger",
    "french fries", "a hot dog", "a taco", "sushi", "an ice cream cone", "a donut",
    "a cookie", "a glass of milk", "a bottle of wine", "a beer mug",
    "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
    "A photo of something very small in the middle of a plain background.",
]


def eval_captions() -> list[str]:
    out = list(_SENTENCES)
    for colour, thing in itertools.product(_COLOURS, _THINGS):
        out.append(f"a {colour} {thing}")
    for size, colour, shape in itertools.product(["small", "large"], _COLOURS[:5], _THINGS[:3]):
        out.append(f"a {size} {colour} {shape}")
    return out

"""The synthetic shapes world's vocabulary: its shapes (and their COCO category ids), colours and sizes.

Its own module, so that the task builder and the chat scorer read these names without importing the world
generator (`python -m grounded_llava.data.synthetic` then runs that module once, without a warning).
"""

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ellipse", "diamond")
SHAPE_IDS = {name: index + 1 for index, name in enumerate(SHAPES)}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 50),
    "purple": (145, 60, 185),
    "orange": (250, 140, 30),
    "cyan": (60, 215, 225),
    "white": (248, 248, 248),
}
SIZES = {"small": (0.10, 0.15), "medium": (0.19, 0.25), "large": (0.29, 0.36)}  # diameter / image side

__all__ = ["COLORS", "SHAPES", "SHAPE_IDS", "SIZES"]

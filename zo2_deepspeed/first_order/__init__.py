"""A first-order tail trained from the ZO step's own forwards (hybrid training); see ``part.FirstOrderPart``."""

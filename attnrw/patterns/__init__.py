"""Matchers: aten FX graph -> attention sites. They read graphs and never change them."""

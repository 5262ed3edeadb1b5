"""Client end, privacy (survey §VI-A): what a site does to its update before it leaves the site."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)

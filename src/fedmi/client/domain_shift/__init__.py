"""Client end, domain shift among sites (survey §IV-A): methods that keep what is site-specific at the site."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)

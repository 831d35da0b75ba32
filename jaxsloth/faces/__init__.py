"""Other projects' config files and APIs, read as jaxsloth settings."""

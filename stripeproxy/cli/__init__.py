"""Entry points: ``twistd`` taps (Options + makeService) and the key tool."""

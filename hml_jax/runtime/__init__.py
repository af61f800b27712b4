"""What every layer may use: errors, files, downloads, the host set-up, the console, malloc."""

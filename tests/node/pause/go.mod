module sidegate.local/pause

go 1.22

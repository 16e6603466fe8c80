module example.com/keypool

go 1.19

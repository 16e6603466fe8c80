module github.com/keypool/keypool/go

go 1.19

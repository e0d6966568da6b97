// Command exact-gen compresses stdin to stdout with the Go encoders whose output
// fleetdelta's crates/engine/src/layer/exact module reproduces, so tests can compare the two.
//
// Build it with Debian's Go and -dev packages, outside module mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o exact-gen ./tools/exact-gen
//
// Usage: exact-gen MODE [BLOCK_SIZE]
//
//	pgzip BLOCK   klauspost/pgzip at DefaultCompression, SetConcurrency(BLOCK, 4)
//	kpgzip        klauspost/compress/gzip at DefaultCompression
//	stdgzip       the standard library's compress/gzip at DefaultCompression
package main

import (
	stdgzip "compress/gzip"
	"fmt"
	"io"
	"os"
	"strconv"

	kpgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/pgzip"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "exact-gen:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("usage: exact-gen pgzip BLOCK | kpgzip | stdgzip")
	}
	var w io.WriteCloser
	switch args[0] {
	case "pgzip":
		if len(args) != 2 {
			return fmt.Errorf("pgzip needs a block size")
		}
		block, err := strconv.Atoi(args[1])
		if err != nil {
			return err
		}
		z := pgzip.NewWriter(os.Stdout)
		if err := z.SetConcurrency(block, 4); err != nil {
			return err
		}
		w = z
	case "kpgzip":
		w = kpgzip.NewWriter(os.Stdout)
	case "stdgzip":
		w = stdgzip.NewWriter(os.Stdout)
	default:
		return fmt.Errorf("unknown mode %q", args[0])
	}
	if _, err := io.Copy(w, os.Stdin); err != nil {
		return err
	}
	return w.Close()
}
